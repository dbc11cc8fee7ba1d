# Builds docs/results/2026-12-07-ec/sweep-main-ec.json: sweep-main-meta8.json (main sweep, later rows, KLT
# and 8-bit-metadata rows, llama.cpp column) with the entropy-coded KLT key rows (ec-16w-{a,b,c,d,e}.json)
# appended, measured by `kvq eval ppl` in the same setting (alice29.txt, 16 windows of 1024, stride 512,
# chunk 128, 8,192 tokens scored). Run from the repository root; then:
# kvq eval sweep --replot --json docs/results/2026-12-07-ec/sweep-main-ec.json.
import importlib.util

spec = importlib.util.spec_from_file_location('add_klt', 'docs/results/2026-12-07-klt/add-klt.py')
add_klt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(add_klt)
D = 'docs/results/2026-12-07-ec/'
add_klt.append_rows('docs/results/2026-12-07-klt-global/sweep-main-meta8.json', D,
                    ('ec-16w-a.json', 'ec-16w-b.json', 'ec-16w-c.json', 'ec-16w-d.json', 'ec-16w-e.json'), D + 'sweep-main-ec.json')
