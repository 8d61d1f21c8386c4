"""ONNX from in-memory files (`memfiles.MemoryFile`): the ONNX frontend's importer, with the model
parsed from a buffer and external data looked up among the folder's other in-memory files
(views, no copies), with the same checks as on disk: a location inside the folder, a file that
exists, an offset and length that fit the shape."""

from __future__ import annotations

from isthmus.compiler.frontends.memfiles import MemoryFile
from isthmus.compiler.frontends.onnx import _Importer, _short
from isthmus.compiler.ir import Graph
from isthmus.errors import ModelFormatError


def load_onnx_from(file: MemoryFile) -> Graph:
    try:
        data = file.buffer()
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: no such file") from None
    return _MemoryImporter(_parse(data, str(file)), file).run()


def _parse(data, name: str):
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ValueError... on bad bytes
        raise ModelFormatError(f"{name}: not a valid ONNX model ({_short(e)})") from None
    if not model.HasField("graph") or not model.graph.output or not model.opset_import:
        raise ModelFormatError(f"{name}: not a valid ONNX model (no graph, outputs or opset)")
    return model


class _MemoryImporter(_Importer):
    def _external(self, t, nbytes: int):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not isinstance(loc, str) or not loc:
            self.fail(f"tensor {t.name!r}: bad external data location")
        data = self.path.folder.lookup(loc)
        if data is None:
            self.fail(f"tensor {t.name!r}: external data file {loc!r} is missing (or outside the model's folder)")
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", nbytes))
        except ValueError:
            self.fail(f"tensor {t.name!r}: bad external data offset or length")
        if length != nbytes or offset < 0 or offset + nbytes > len(data):
            self.fail(f"tensor {t.name!r}: external data {loc!r} is truncated or does not match the shape")
        return data[offset:offset + nbytes]
