import pytest
import torch

from secateurs.errors import UnsupportedOpError
from secateurs.ir.rules import RULES, OpRuleTable

aten = torch.ops.aten


def _noop(ctx, node):
    return None


def test_table_refuses_packets_duplicates_and_non_ops():
    table = OpRuleTable()
    with pytest.raises(UnsupportedOpError, match="packet"):
        table.register([aten.add], _noop)
    table.register([aten.add.Tensor], _noop)
    with pytest.raises(UnsupportedOpError, match="already has a rule"):
        table.register([aten.add.Tensor], _noop)
    with pytest.raises(UnsupportedOpError, match="not an op"):
        table.register([42], _noop)


def test_core_ops_have_rules():
    import secateurs.ir.aten_rules  # noqa: F401

    for op in [aten.conv2d.default, aten.linear.default, aten.batch_norm.default, aten.layer_norm.default,
               aten.group_norm.default, aten.embedding.default, aten.add.Tensor, aten.mul.Tensor, aten.cat.default,
               aten.split.Tensor, aten.chunk.default, aten.slice.Tensor, aten.select.int, aten.view.default,
               aten.reshape.default, aten.flatten.using_ints, aten.permute.default, aten.transpose.int,
               aten.scaled_dot_product_attention.default, aten.max_pool2d.default, aten.adaptive_avg_pool2d.default,
               aten.relu.default, aten.dropout.default, aten.matmul.default, aten.addmm.default, aten.bmm.default,
               aten.conv_transpose2d.input, aten.rms_norm.default]:
        assert op in RULES, op
