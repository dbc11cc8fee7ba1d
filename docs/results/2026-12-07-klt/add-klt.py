# Builds docs/results/2026-12-07-klt/sweep-main-klt.json: the 2026-12-06 sweep-main-plus.json (main sweep
# + later rows, llama.cpp column) with the KLT rows of klt-16w.json and klt-kivi-16w.json (KLT keys with KIVI
# values) appended, measured by `kvq eval ppl` in the same setting (alice29.txt, 16 windows of 1024, stride 512, chunk 128, 8,192 tokens scored).
# `append_rows` also serves later result folders' scripts (docs/results/2026-12-07-klt-global/add-meta8.py).
import json


def append_rows(base_path, folder, names, out_path):
    """Appends the rows of folder/name for each of names to the sweep JSON at base_path, checking each
    file was measured in the sweep's setting, and writes the result to out_path."""
    base = json.load(open(base_path))
    have = {r['kv'] for r in base['results']}
    for name in names:
        d = json.load(open(folder + name))
        o = d['opts']
        assert o['ctx'] == 1024 and o['max_windows'] == 16 and o['stride'] == 512 and o['chunk'] == 128
        assert d['text'] == base['text']
        for r in d['results']:
            assert r['windows'] == 16 and r['scored'] == 8192 and r['kv'] not in have
            base['results'].append(r)
            have.add(r['kv'])
            print('added', r['kv'], r['bits_per_elem'], r['ppl'])
    json.dump(base, open(out_path, 'w'), indent=2)


if __name__ == '__main__':
    append_rows('docs/results/2026-12-06-lowbits/sweep-main-plus.json', 'docs/results/2026-12-07-klt/',
                ('klt-16w.json', 'klt-kivi-16w.json'), 'docs/results/2026-12-07-klt/sweep-main-klt.json')
