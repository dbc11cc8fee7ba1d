# Builds docs/results/2026-12-07-klt-global/sweep-main-meta8.json: sweep-main-klt.json (main sweep, later
# rows, KLT rows, llama.cpp column) with the 8-bit value metadata rows of meta8-16w-3bits.json and
# meta8-16w-2.2bits.json, and of the score-distance key files (scores-16w-*.json), appended, measured by `kvq eval ppl` in the same setting (alice29.txt, 16 windows
# of 1024, stride 512, chunk 128, 8,192 tokens scored). Then: kvq eval sweep --replot --json <that file>.
import json
D = 'docs/results/2026-12-07-klt-global/'
base = json.load(open('docs/results/2026-12-07-klt/sweep-main-klt.json'))
have = {r['kv'] for r in base['results']}
for name in ('meta8-16w-3bits.json', 'meta8-16w-2.2bits.json', 'scores-16w-3bits.json', 'scores-16w-2.2bits.json'):
    d = json.load(open(D + name))
    o = d['opts']
    assert o['ctx'] == 1024 and o['max_windows'] == 16 and o['stride'] == 512 and o['chunk'] == 128
    assert d['text'] == base['text']
    for r in d['results']:
        assert r['windows'] == 16 and r['scored'] == 8192 and r['kv'] not in have
        base['results'].append(r)
        have.add(r['kv'])
        print('added', r['kv'], r['bits_per_elem'], r['ppl'])
json.dump(base, open(D + 'sweep-main-meta8.json', 'w'), indent=2)
