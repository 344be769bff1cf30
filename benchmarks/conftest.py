"""pytest-benchmark suite: `pytest benchmarks/` (add `--benchmark-json FILE` to keep the numbers).

The cases are those of `fastppo bench` (fastppo.bench.build_cases). Kernel cases need a GPU and
are skipped without one; on a CPU the references run on small shapes. Timing belongs here, never
in tests/.
"""

import torch

ON_GPU = torch.cuda.is_available()
