"""The CUDA backend: kernel specs (`_spec`), NVRTC compilation and its caches (`_compile`),
parameter blocks and launches (`_launch_common`, `_kernel_call`), the forward's dispatch for
sm80 and SIMT (`_launch`), the Hopper kernels' plans (`_launch_sm90`), the backward's
(`_launch_bwd`), split-KV decoding (`_decode`), replays of repeated calls (`_replay`) and
compiling ahead (`_warmup`). The core API (`cuflash._core`) reaches it; it imports the
problem description (`cuflash._variant`, `_dtypes`, `_interop`, ...) and nothing above."""
