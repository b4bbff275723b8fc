"""The engine: training loop, data, RecA sample builder, checkpoints, metrics and the CLI.

Submodules are imported on use (`reca.engine.train`, `reca.engine.data`, ...): importing this
package does nothing else.
"""

from reca import _folder

__path__ += _folder("engine")  # the modules of engine/ (see reca._folder)
