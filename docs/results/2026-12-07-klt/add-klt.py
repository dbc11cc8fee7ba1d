# Builds docs/results/2026-12-07-klt/sweep-main-klt.json: the 2026-12-06 sweep-main-plus.json (main sweep
# + later rows, llama.cpp column) with the KLT rows of klt-16w.json and klt-kivi-16w.json (KLT keys with KIVI
# values) appended, measured by `kvq eval ppl` in the same setting (alice29.txt, 16 windows of 1024, stride 512, chunk 128, 8,192 tokens scored).
import json
base = json.load(open('docs/results/2026-12-06-lowbits/sweep-main-plus.json'))
have = {r['kv'] for r in base['results']}
for name in ('klt-16w.json', 'klt-kivi-16w.json'):
    d = json.load(open('docs/results/2026-12-07-klt/' + name))
    o = d['opts']
    assert o['ctx'] == 1024 and o['max_windows'] == 16 and o['stride'] == 512 and o['chunk'] == 128
    assert d['text'] == base['text']
    for r in d['results']:
        assert r['windows'] == 16 and r['scored'] == 8192 and r['kv'] not in have
        base['results'].append(r)
        have.add(r['kv'])
        print('added', r['kv'], r['bits_per_elem'], r['ppl'])
json.dump(base, open('docs/results/2026-12-07-klt/sweep-main-klt.json', 'w'), indent=2)
