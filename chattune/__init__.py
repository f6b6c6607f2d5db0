"""chattune: turn a small open chat model into a specialist."""

import logging

# bitsandbytes warns at import time that optional CPU kernels are missing; it runs fine without them.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
