"""The op set. Importing this package registers every op (one file per op family)."""

from isthmus.compiler.ops import attention, elementwise, index, matmul, norm, reduce, shape, tensor  # noqa: F401  (registers)
from isthmus.compiler.ops.registry import (COMMUTATIVE, ELEMENTWISE, OPS, ROW_WISE, SHAPE_ONLY,  # noqa: F401
                                           OpDef, define, get_op)
