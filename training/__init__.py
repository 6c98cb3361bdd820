"""lmforge.training: what every rank does (config, dist, data, tasks, model, engine, checkpoint, metrics, evaluate, train)."""

import logging as _logging

# torchao (installed for `lmforge compress --recipe int8-torchao`) is imported by transformers/peft in
# every process and warns once per process that its CUDA-only kernels do not load on a CPU build:
# harmless here, and on N ranks it buries the run's own log.
# Its enum registration also draws a torch deprecation warning per process, for the same reason.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
