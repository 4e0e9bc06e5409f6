"""The benchmarks behind `python -m seqpar bench`: `exact` (every strategy against dense
attention and the peers; the main job), `linear` (the linear-attention methods), `grid`
(the dispatcher's cost model against measurement), sharing `common` (progress, output
files, the machine's description)."""
