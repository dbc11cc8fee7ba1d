# Builds docs/results/2026-12-08-tcq/sweep-main-tcq.json: the 2026-12-07 sweep with its entropy-coded rows
# (../2026-12-07-ec/sweep-main-ec.json) and the trellis-coded KLT key rows (tcq-16w-{a,b,c}.json) appended,
# measured by `kvq eval ppl` in the same setting (alice29.txt, 16 windows of 1024, stride 512, chunk 128,
# 8,192 tokens scored). Run from the repository root; then:
# kvq eval sweep --replot --json docs/results/2026-12-08-tcq/sweep-main-tcq.json.
import importlib.util

spec = importlib.util.spec_from_file_location('add_klt', 'docs/results/2026-12-07-klt/add-klt.py')
add_klt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(add_klt)
D = 'docs/results/2026-12-08-tcq/'
add_klt.append_rows('docs/results/2026-12-07-ec/sweep-main-ec.json', D,
                    ('tcq-16w-a.json', 'tcq-16w-b.json', 'tcq-16w-c.json'), D + 'sweep-main-tcq.json')
