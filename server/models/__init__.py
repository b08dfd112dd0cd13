"""The models that ship with protoserve, registered with the runtime's loader as sources.

``bytelm`` (:mod:`.builtin`, trained by :mod:`.train`) and TorchScript and
``torch.export`` files (:mod:`.torchfile`). ``protoserve.server`` imports this
package, so every server, ``LocalClient`` and model repository has them.
"""

from __future__ import annotations

from protoserve.server.models.builtin import ByteLMModel
from protoserve.server.models.torchfile import FILE_SUFFIXES, TorchFileModel
from protoserve.server.runtime.loader import register_file_type, register_source

register_source(ByteLMModel.name, ByteLMModel)
register_file_type(FILE_SUFFIXES, TorchFileModel)
