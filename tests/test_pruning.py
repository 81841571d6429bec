"""prune(): structured removal that really shrinks the model, picks the right groups, and reloads exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from conftest import model_inputs, tiny_model
from dit_optimum import DiTOptimumPipeline, DiTOptimumTransformer2DModel, count_gflops, count_parameters
from dit_optimum.cli import main
from dit_optimum.techniques.pruning import importance_scores, prune, teacher_and_student


def outputs(model):
    with torch.no_grad():
        return model(*model_inputs(model)).sample


@pytest.mark.parametrize("attention_type", ["sdpa", "shallow", "mediated", "focused"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_model_is_smaller_runs_and_reloads_exactly(tmp_path, attention_type, scope):
    model = tiny_model(attention_type=attention_type, num_layers=4)
    pruned = prune(model, heads=0.5, mlp=0.5, depth=0.25, scope=scope)
    assert pruned.config.num_layers == 3 and sum(pruned.config.layer_heads) == 6
    assert sum(pruned.config.layer_mlp_dims) == 3 * 64
    assert count_parameters(pruned) < 0.6 * count_parameters(model)
    assert count_gflops(pruned) < 0.6 * count_gflops(model)
    pruned.save_pretrained(tmp_path)
    reloaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(outputs(reloaded.eval()), outputs(pruned))
    assert torch.isfinite(outputs(pruned)).all()


def test_removing_groups_that_contribute_nothing_leaves_outputs_unchanged():
    model = tiny_model(num_layers=3)
    dim = model.inner_dim
    with torch.no_grad():
        # block 1: zero gates (identity); head 2 of each block: zero out-columns; MLP units 0..31: zero fc2 columns
        model.transformer_blocks[1].norm1.linear.weight[2 * dim : 3 * dim] = 0
        model.transformer_blocks[1].norm1.linear.bias[2 * dim : 3 * dim] = 0
        model.transformer_blocks[1].norm1.linear.weight[5 * dim :] = 0
        model.transformer_blocks[1].norm1.linear.bias[5 * dim :] = 0
        for block in model.transformer_blocks:
            block.attn1.to_out[0].weight[:, 16:24] = 0
            block.attn1.to_q.weight[16:24] *= 0.01
            block.ff.net[2].weight[:, :32] = 0
            block.ff.net[0].proj.weight[:32] *= 0.01
    pruned = prune(model, heads=0.25, mlp=0.25, depth=0.34, importance="l2")
    assert pruned.config.num_layers == 2 and pruned.config.layer_heads == [3, 3]
    torch.testing.assert_close(outputs(pruned), outputs(model), rtol=1e-5, atol=1e-5)


def test_taylor_and_random_importance():
    model = tiny_model()
    taylor = importance_scores(model, "taylor", batches=2)
    assert [len(s) for s in taylor["heads"]] == [4, 4] and taylor["blocks"].shape == (2,)
    assert all((s > 0).all() for s in taylor["mlp"])
    assert all(p.grad is None for p in model.parameters())
    data, labels = torch.randn(6, 4, 8, 8), torch.randint(0, 10, (6,))
    with_data = importance_scores(model, "taylor", data=data, labels=labels, batches=2)
    assert not torch.allclose(with_data["heads"][0], taylor["heads"][0])
    first, second = importance_scores(model, "random", seed=3), importance_scores(model, "random", seed=3)
    assert torch.equal(first["blocks"], second["blocks"])
    assert prune(model, mlp=0.5, importance="taylor").config.layer_mlp_dims == [64, 64]


def test_global_scope_moves_width_between_layers_but_keeps_each_layer_alive():
    model = tiny_model(num_layers=2)
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[0].proj.weight.mul_(10)
    pruned = prune(model, mlp=0.5, scope="global")
    assert pruned.config.layer_mlp_dims[0] > pruned.config.layer_mlp_dims[1] >= 1
    assert sum(pruned.config.layer_mlp_dims) == 128


def test_pipeline_in_pipeline_out_round_trips_through_diffusers(tmp_path):
    pipe = DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler(), id2label={2: "two"})
    pruned = prune(pipe, heads=0.25, mlp=0.25)
    assert isinstance(pruned, DiTOptimumPipeline) and pruned.labels == {"two": 2}
    assert pipe.transformer.config.layer_heads is None, "the input pipeline stays untouched"
    pruned.save_pretrained(tmp_path)
    kwargs = {"num_inference_steps": 3, "output_type": "pt"}
    before = pruned([2, 5], generator=torch.manual_seed(0), **kwargs).images
    after = DiffusionPipeline.from_pretrained(tmp_path)([2, 5], generator=torch.manual_seed(0), **kwargs).images
    assert torch.equal(before, after)


def test_teacher_and_student_for_recovery_fine_tuning():
    teacher, student = teacher_and_student(tiny_model(), mlp=0.5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert count_parameters(student) < count_parameters(teacher)


BAD = [
    ({"heads": 1.0}, r"`heads`=1\.0 must be a fraction in \[0, 1\)"),
    ({"mlp": -0.1}, "`mlp`"),
    ({"depth": "half"}, "`depth`"),
    ({"heads": 0.9}, r"removes every one of the 4 heads of layer 0"),
    ({"importance": "hessian"}, r"`importance`='hessian'.*l1, l2, taylor, random"),
    ({"scope": "model"}, r"`scope`='model'.*layer, global"),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=lambda v: str(v))
def test_bad_arguments_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny_model(), **options)


@pytest.mark.parametrize("attention_type", ["gqa", "focused_gqa", "mqa", "focused_mqa"])
def test_head_pruning_with_shared_kv_heads_removes_whole_groups(tmp_path, attention_type):
    model = tiny_model(attention_type=attention_type, num_kv_heads=2 if "gqa" in attention_type else None)
    pruned = prune(model, heads=0.5)
    assert pruned.config.layer_heads == [2, 2]
    attn = pruned.transformer_blocks[0].attn1
    assert (attn.heads, attn.kv_heads) == (2, 1)  # gqa: one of two groups left; mqa: the shared K/V head kept
    assert attn.to_k.out_features == 8
    pruned.save_pretrained(tmp_path)
    assert torch.equal(outputs(DiTOptimumTransformer2DModel.from_pretrained(tmp_path).eval()), outputs(pruned))


def test_gqa_head_pruning_equals_dropping_a_silent_group():
    model = tiny_model(attention_type="gqa", num_kv_heads=2)
    with torch.no_grad():
        for block in model.transformer_blocks:  # group 1 = query heads 2, 3 (output columns 16..31)
            block.attn1.to_out[0].weight[:, 16:32] = 0
            block.attn1.to_q.weight[16:32] *= 0.01
    torch.testing.assert_close(outputs(prune(model, heads=0.5)), outputs(model), rtol=1e-5, atol=1e-5)


def test_layer_heads_must_keep_whole_groups():
    config = {**tiny_model().config, "attention_type": "gqa", "num_kv_heads": 2, "layer_heads": [3, 2]}
    with pytest.raises(ValueError, match="multiples of 2"):
        DiTOptimumTransformer2DModel(**config)


def test_cli_prune_and_quantize(tmp_path, capsys):
    pipe = DiTOptimumPipeline(transformer=tiny_model(), scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "base")
    assert main(["prune", str(tmp_path / "base"), str(tmp_path / "pruned"), "--heads", "0.5", "--depth", "0.5"]) == 0
    assert "GFLOPs" in capsys.readouterr().out
    assert DiTOptimumPipeline.from_pretrained(tmp_path / "pruned").transformer.config.num_layers == 1
    code = main(
        ["quantize", str(tmp_path / "pruned"), str(tmp_path / "int8"), "--backend", "quanto", "--weights", "int8"]
    )
    assert code == 0 and "PSNR" in capsys.readouterr().out
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "int8")
    assert reloaded.transformer.config.quantization_config.weights_dtype == "int8"
    code = main(
        ["quantize", str(tmp_path / "base"), str(tmp_path / "x"), "--backend", "quanto", "--activations", "int8"]
    )
    assert code == 2 and "cannot be saved" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_fraction_too_small_to_remove_anything_warns(caplog):
    model = tiny_model(attention_type="gqa", num_kv_heads=2)
    with caplog.at_level("WARNING", logger="dit_optimum.techniques.pruning"):
        pruned = prune(model, heads=0.2)
    assert pruned.config.layer_heads is None and "removes nothing" in caplog.text
