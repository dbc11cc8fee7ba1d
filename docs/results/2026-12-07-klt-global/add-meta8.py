# Builds docs/results/2026-12-07-klt-global/sweep-main-meta8.json: sweep-main-klt.json (main sweep, later
# rows, KLT rows, llama.cpp column) with the 8-bit value metadata rows (meta8-16w-*.json) and those of the
# score-distance key files (scores-16w-*.json, early3-16w-2.2bits.json) appended, measured by `kvq eval ppl` in the same setting
# (alice29.txt, 16 windows of 1024, stride 512, chunk 128, 8,192 tokens scored). Run from the repository
# root; then: kvq eval sweep --replot --json docs/results/2026-12-07-klt-global/sweep-main-meta8.json.
import importlib.util

spec = importlib.util.spec_from_file_location('add_klt', 'docs/results/2026-12-07-klt/add-klt.py')
add_klt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(add_klt)
D = 'docs/results/2026-12-07-klt-global/'
add_klt.append_rows('docs/results/2026-12-07-klt/sweep-main-klt.json', D,
                    ('meta8-16w-3bits.json', 'meta8-16w-2.2bits.json', 'scores-16w-3bits.json',
                     'scores-16w-2.2bits.json', 'early3-16w-2.2bits.json'), D + 'sweep-main-meta8.json')
