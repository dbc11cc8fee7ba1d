# Builds docs/results/2026-12-06-lowbits/sweep-main-plus.json: the main sweep's JSON with rows measured
# later by `kvq eval ppl` in the same setting (alice29.txt, 16 windows of 1024, stride 512, chunk 128).
import json, sys
base = json.load(open('docs/results/2026-11-24-quality/sweep-main.json'))
add = [
    ('docs/results/2026-12-06-nf/nf-rot-clip.json', None),
    ('docs/results/2026-12-06-rvq-depth/rvq16.json', 'depth=11'),
] + [(a, b) for a, b in (x.split('::') if '::' in x else (x, None) for x in sys.argv[1:])]
have = {r['kv'] for r in base['results']}
for path, needle in add:
    d = json.load(open(path))
    assert d['opts']['ctx'] == 1024 and d['opts']['max_windows'] == 16 and d['opts']['stride'] == 512 and d['opts']['chunk'] == 128, path
    assert d['text'] == base['text'], path
    for r in d['results']:
        if needle and needle not in r['kv']:
            continue
        if r['kv'] in have or r['kv'] == 'fp16':
            continue
        assert r['windows'] == 16 and r['scored'] == 8192
        base['results'].append(r)
        have.add(r['kv'])
        print('added', r['kv'], r['bits_per_elem'], r['ppl'])
json.dump(base, open('docs/results/2026-12-06-lowbits/sweep-main-plus.json', 'w'), indent=2)
