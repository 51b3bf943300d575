"""hotdog_torch: an MLP that tells hot dog from not hot dog, trained the way the seed teaches (README.md).

`python -m hotdog_torch.train` imports this package before train.py, and so before torch (2 s of start-up here):
the image folders of its run start decoding here, in a process of its own, while torch loads (cache.prefetch).
"""

import sys

_argv = getattr(sys, "orig_argv", [])
if any(a == "-m" and b == "hotdog_torch.train" for a, b in zip(_argv, _argv[1:], strict=False)):
    import signal

    from . import cache, cli

    signal.signal(signal.SIGINT, cli.interrupted_while_starting)  # until cli.run calls train.main
    cache.prefetch(_argv[_argv.index("hotdog_torch.train") + 1 :])
