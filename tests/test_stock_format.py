"""Pipelines in diffusers' own format: what stock diffusers can represent is saved with its classes and loads in a
fresh Python that never imports dit_optimum (from a local folder and through a local Hub), giving the package's
images exactly; everything else keeps the package format, which loads after ``import dit_optimum``."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from safetensors import safe_open

from conftest import tiny_autoencoder, tiny_model, tiny_pixel_pipeline
from dit_optimum import DiTOptimumError, DiTOptimumPipeline, DiTOptimumTransformer2DModel, prune, quantize
from dit_optimum.hub.cards import loading_code
from dit_optimum.hub.releases import save_half_precision_variants
from dit_optimum.models.stock import MARKER_KEY, folder_stock_problem, stock_format_problem
from local_hub import local_hub

ID2LABEL = {0: "zero", 1: "one", 7: "seven"}
LABELS = [1, 7]
GUIDANCE = (4.0, 1.0)
STEPS = 3
# diffusers' message for a folder naming a component library the process has not imported (diffusers 0.42.1)
NOT_IMPORTED = "import dit_optimum before calling `from_pretrained`"


def tiny_vae() -> AutoencoderKL:
    return tiny_autoencoder(channels=3, levels=1, sample_size=16)


def latent_pipeline(**overrides) -> DiTOptimumPipeline:
    pipe = DiTOptimumPipeline(
        transformer=tiny_model(**overrides), vae=tiny_vae(), scheduler=DDIMScheduler(), id2label=ID2LABEL
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, guidance: float) -> np.ndarray:
    generator = torch.manual_seed(0)
    return pipe(
        LABELS, guidance_scale=guidance, num_inference_steps=STEPS, generator=generator, output_type="np"
    ).images


def with_vae_dtype(pipe: DiTOptimumPipeline, dtype: torch.dtype) -> DiTOptimumPipeline:
    """``pipe`` with its VAE in ``dtype``, as ``from_pretrained(..., torch_dtype=dtype)`` loads it (stock DiTPipeline
    decodes the transformer's latents without casting them)."""
    copied = DiTOptimumPipeline(
        transformer=pipe.transformer,
        vae=copy.deepcopy(pipe.vae).to(dtype),
        scheduler=pipe.scheduler,
        id2label=pipe.config.id2label,
    )
    copied.set_progress_bar_config(disable=True)
    return copied


def load_kwargs(pipe: DiTOptimumPipeline) -> dict:
    # torchao models load in bfloat16 unless told otherwise, half-precision weights in float32: name the dtype
    dtype = pipe.transformer.dtype
    quantized = getattr(pipe.transformer.config, "quantization_config", None) is not None
    return {} if dtype == torch.float32 and not quantized else {"torch_dtype": str(dtype).removeprefix("torch.")}


# What runs in a fresh Python that never imports dit_optimum: each check loads a folder (or a repo id through the
# local Hub) with plain `DiffusionPipeline.from_pretrained`, samples as the package did and compares.
FRESH = r"""
import json, sys, warnings
import numpy as np, torch
from diffusers import DiffusionPipeline

spec = json.loads(sys.argv[1])
results = {}
for check in spec["checks"]:
    kwargs = dict(check["kwargs"])
    if "torch_dtype" in kwargs:
        kwargs["torch_dtype"] = getattr(torch, kwargs["torch_dtype"])
    pipe = DiffusionPipeline.from_pretrained(check["source"], **kwargs)
    pipe.set_progress_bar_config(disable=True)
    result = {"classes": [type(pipe).__name__, type(pipe.transformer).__name__, type(pipe.vae).__name__]}
    result["quantized"] = sorted({type(m).__name__ for m in pipe.transformer.modules() if "QLinear" in type(m).__name__}
                                 | {type(m.weight).__name__ for m in pipe.transformer.modules()
                                    if isinstance(m, torch.nn.Linear) and type(m.weight) is not torch.nn.Parameter})
    for guidance, reference in check["references"].items():
        generator = torch.manual_seed(0)
        out = pipe(spec["labels"], guidance_scale=float(guidance), num_inference_steps=spec["steps"],
                   generator=generator, output_type="np").images
        result[guidance] = [float(np.abs(out - np.load(path)).max()) for path in reference]
    results[check["name"]] = result
for name, source in spec["package"].items():
    try:
        DiffusionPipeline.from_pretrained(source)
        results[name] = "loaded"
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
if spec.get("card"):
    exec(compile(spec["card"], "card", "exec"), {})
results["imported"] = "dit_optimum" in sys.modules
print("RESULTS " + json.dumps(results))
"""

# The same loading line in a fresh Python, after `import dit_optimum`: the package format loads.
WITH_PACKAGE = r"""
import json, sys
import numpy as np, torch
import dit_optimum  # noqa: F401
from diffusers import DiffusionPipeline

spec = json.loads(sys.argv[1])
results = {}
for name, (source, reference) in spec.items():
    loader = dit_optimum.DiTOptimumPipeline if name.startswith("ours") else DiffusionPipeline
    pipe = loader.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.manual_seed(0)
    out = pipe([1, 7], guidance_scale=4.0, num_inference_steps=3, generator=generator, output_type="np").images
    results[name] = [type(pipe.transformer).__name__, pipe.transformer.config.num_embeds_ada_norm,
                     float(np.abs(out - np.load(reference)).max())]
print("RESULTS " + json.dumps(results))
"""


def run_fresh(code: str, spec: dict, env: dict, cwd: Path) -> tuple[dict, str]:
    # the same thread count as this process (conftest.py sets it): a matmul split across another number of threads
    # rounds differently, and the images are compared bit for bit
    env = {**env, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS ")), result.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Stock-representable pipelines saved by the package, their reference images, and a package-format one."""
    root = tmp_path_factory.mktemp("stock")
    base = latent_pipeline(num_layers=2)
    student = prune(latent_pipeline(num_layers=4, seed=3), depth=0.5)  # a depth-pruned (distilled-style) student
    pipelines = {
        "fp32": base,
        "bf16": quantize(base, backend="torch", weights="bf16"),
        "torchao-int8": quantize(base, backend="torchao", weights="int8"),
        "quanto-int8": quantize(base, backend="quanto", weights="int8"),
        "depth-pruned": student,
    }
    folders, references = {}, {}
    for name, pipe in pipelines.items():
        assert stock_format_problem(pipe) is None, name
        pipe.save_pretrained(root / name)
        dtype = pipe.transformer.dtype
        # the package's pipeline: in memory (its VAE in the dtype a loader gives it), and loaded from the folder
        kwargs = load_kwargs(pipe)
        ours = DiTOptimumPipeline.from_pretrained(root / name, **{k: getattr(torch, v) for k, v in kwargs.items()})
        ours.set_progress_bar_config(disable=True)
        in_memory = pipe if dtype == torch.float32 else with_vae_dtype(pipe, dtype)
        references[name] = {}
        for guidance in GUIDANCE:
            paths = []
            for kind, source in (("memory", in_memory), ("loaded", ours)):
                path = root / "references" / f"{name}-{kind}-{guidance}.npy"
                path.parent.mkdir(exist_ok=True)
                np.save(path, images(source, guidance))
                paths.append(str(path))
            references[name][str(guidance)] = paths
        folders[name] = (root / name, kwargs)
    # float16 / bfloat16 variants beside the float32 files, as a release writes them
    assert save_half_precision_variants(base, root / "fp32") == ["fp16", "bf16"]
    for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        name = f"fp32-variant-{variant}"
        kwargs = {"variant": variant, "torch_dtype": str(dtype).removeprefix("torch.")}
        ours = DiTOptimumPipeline.from_pretrained(root / "fp32", variant=variant, torch_dtype=dtype)
        ours.set_progress_bar_config(disable=True)
        path = root / "references" / f"{name}.npy"
        np.save(path, images(ours, 4.0))
        references[name] = {"4.0": [str(path)]}
        folders[name] = (root / "fp32", kwargs)
    package = tiny_pixel_pipeline(channels=3, attention_type="mediated", num_mediators=4)
    package.save_pretrained(root / "package")
    np.save(root / "references" / "package.npy", images(package, 4.0))
    return root, folders, references


def test_representable_pipelines_load_without_the_package_from_a_folder_and_a_local_hub(saved, tmp_path):
    root, folders, references = saved
    checks = [
        {"name": name, "source": str(folder), "kwargs": kwargs, "references": references[name]}
        for name, (folder, kwargs) in folders.items()
    ]
    hub_repos = {
        "org/dit-fp32": root / "fp32",
        "org/dit-torchao": root / "torchao-int8",
        "org/dit-pkg": root / "package",
    }
    checks += [
        {"name": "hub-fp32", "source": "org/dit-fp32", "kwargs": {}, "references": references["fp32"]},
        {
            "name": "hub-torchao-int8",
            "source": "org/dit-torchao",
            "kwargs": folders["torchao-int8"][1],
            "references": references["torchao-int8"],
        },
        {
            "name": "hub-fp32-variant-fp16",
            "source": "org/dit-fp32",
            "kwargs": folders["fp32-variant-fp16"][1],
            "references": references["fp32-variant-fp16"],
        },
    ]
    card = loading_code("org/dit-fp32", {"technique": "baseline", "dtype": "float32"}, None)
    assert "dit_optimum" not in card
    spec = {
        "checks": checks,
        "labels": LABELS,
        "steps": STEPS,
        "package": {"package-folder": str(root / "package"), "package-hub": "org/dit-pkg"},
        "card": card,
    }
    with local_hub(tmp_path / "hub", hub_repos) as url:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
        results, stderr = run_fresh(FRESH, spec, env, tmp_path)
        package, _ = run_fresh(
            WITH_PACKAGE,
            {
                "folder": [str(root / "package"), str(root / "references" / "package.npy")],
                "hub": ["org/dit-pkg", str(root / "references" / "package.npy")],
                "ours-stock-hub": ["org/dit-fp32", references["fp32"]["4.0"][0]],
            },
            env,
            tmp_path,
        )
    assert results.pop("imported") is False  # the fresh process never imported dit_optimum
    assert "are not expected and will be ignored" not in stderr  # no config key stock diffusers does not know
    assert (tmp_path / "sample.png").is_file()  # the card's code ran as printed
    messages = {name: results.pop(name) for name in ("package-folder", "package-hub")}
    for name, result in results.items():
        assert result.pop("classes") == ["DiTPipeline", "DiTTransformer2DModel", "AutoencoderKL"], name
        quantized = result.pop("quantized")
        assert bool(quantized) == ("torchao" in name or "quanto" in name), (name, quantized)
        for guidance, differences in result.items():
            assert differences == [0.0] * len(differences), (name, guidance, differences)  # equal images
    assert len(results) == len(checks)
    # a package-format folder without `import dit_optimum`: diffusers' own refusal, naming the import
    assert NOT_IMPORTED in messages["package-folder"], messages
    assert "dit_optimum" in messages["package-hub"], messages
    # the package format after `import dit_optimum`; and the package's loader gives the stock repo its 10 classes back
    assert package == {
        "folder": ["DiTOptimumTransformer2DModel", 10, 0.0],
        "hub": ["DiTOptimumTransformer2DModel", 10, 0.0],
        "ours-stock-hub": ["DiTOptimumTransformer2DModel", 10, 0.0],
    }


def test_the_stock_folder_holds_diffusers_classes_and_the_package_gets_its_classes_back(saved, tmp_path):
    root, _, references = saved
    index = json.loads((root / "fp32" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["id2label"] == {"0": "zero", "1": "one", "7": "seven"}
    config = json.loads((root / "fp32" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["num_embeds_ada_norm"] == 1000
    assert config[MARKER_KEY] == {"num_classes": 10, "class_dropout_prob": 0.1}
    assert not {"attention_type", "mlp_ratio", "moe_num_experts", "layer_heads"} & set(config)
    files = sorted(p.name for p in (root / "fp32" / "transformer").iterdir())
    assert files == [
        "config.json",
        "diffusion_pytorch_model.bf16.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    # the variants are read by themselves (the float32 weights removed) and hold half-precision tensors
    only_fp16 = tmp_path / "only-fp16"
    shutil.copytree(root / "fp32", only_fp16)
    for folder in ("transformer", "vae"):
        (only_fp16 / folder / "diffusion_pytorch_model.safetensors").unlink()
        with safe_open(str(only_fp16 / folder / "diffusion_pytorch_model.fp16.safetensors"), "pt") as handle:
            names = handle.keys()
            assert {handle.get_tensor(name).dtype for name in names} == {torch.float16}
    pipe = DiTOptimumPipeline.from_pretrained(only_fp16, variant="fp16", torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(pipe, 4.0), np.load(references["fp32-variant-fp16"]["4.0"][0]))
    quantized = json.loads((root / "torchao-int8" / "transformer" / "config.json").read_text())
    assert quantized["quantization_config"]["modules_to_not_convert"] == [
        "pos_embed",
        "norm1.emb",  # our shared `conditioning_embedding` is every stock block's `norm1.emb`
        "proj_out_1",
        "proj_out_2",
    ]
    # the package's loaders give back the 10-class model (the padded rows dropped) and the same images
    for name in ("fp32", "torchao-int8", "quanto-int8"):
        kwargs = {"torch_dtype": torch.bfloat16} if name == "torchao-int8" else {}
        pipe = DiTOptimumPipeline.from_pretrained(root / name, **kwargs)
        transformer = pipe.transformer
        assert isinstance(transformer, DiTOptimumTransformer2DModel) and transformer.num_classes == 10
        assert transformer.conditioning_embedding.class_embedder.embedding_table.weight.shape[0] == 11
        assert MARKER_KEY not in transformer.config
        pipe.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(images(pipe, 4.0), np.load(references[name]["4.0"][1]))
    model = DiTOptimumTransformer2DModel.from_pretrained(root / "quanto-int8" / "transformer")
    assert model.num_classes == 10
    assert model.config.quantization_config.modules_to_not_convert == [
        "linear_1",
        "linear_2",
        "proj_out_1",
        "proj_out_2",
    ]
    loaded = DiTOptimumTransformer2DModel.from_pretrained(root / "torchao-int8" / "transformer")
    assert loaded.config.quantization_config.modules_to_not_convert[1] == "conditioning_embedding"


@pytest.mark.parametrize(
    "marker",
    [
        {"num_classes": 5, "class_dropout_prob": 0.1},  # would drop classes 5..9
        {"num_classes": 20, "class_dropout_prob": 0.1},  # would invent classes 10..19 (copies of the null row)
        {"num_classes": 10, "class_dropout_prob": 0},  # no null class, but the table has one
        {"num_classes": 10, "class_dropout_prob": "0.1"},
        {"num_classes": -1},
        {"num_classes": True},
    ],
)
def test_an_edited_stock_marker_is_refused_naming_it(saved, marker, tmp_path):
    root, _, _ = saved
    folder = tmp_path / "edited"
    shutil.copytree(root / "fp32", folder)
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, MARKER_KEY: marker}))
    for load in (
        lambda: DiTOptimumTransformer2DModel.from_pretrained(folder / "transformer"),
        lambda: DiTOptimumPipeline.from_pretrained(folder),
    ):
        with pytest.raises(DiTOptimumError, match=f"`{MARKER_KEY}` records num_classes"):
            load()


def test_a_loaded_stock_folder_saves_again_as_the_same_folder(saved, tmp_path):
    root, _, references = saved
    for name in ("fp32", "quanto-int8"):
        DiTOptimumPipeline.from_pretrained(root / name).save_pretrained(tmp_path / name)
        for relative in ("model_index.json", "transformer/config.json", "vae/config.json"):
            again, first = (json.loads((folder / relative).read_text()) for folder in (tmp_path / name, root / name))
            again.pop("_name_or_path", None)
            assert again == first, (name, relative)
        again = DiTOptimumPipeline.from_pretrained(tmp_path / name)
        again.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(images(again, 1.0), np.load(references[name]["1.0"][1]))


@pytest.mark.parametrize(("dtype", "variant"), [(torch.bfloat16, None), (torch.float16, "fp16")])
def test_a_pipeline_cast_to_half_precision_gives_the_images_its_saved_folder_gives(dtype, variant, tmp_path):
    # `.to(dtype)` keeps the (unsaved) position table float32, as diffusers' loader leaves it
    pipe = latent_pipeline().to(dtype)
    assert pipe.transformer.pos_embed.pos_embed.dtype == torch.float32
    assert pipe.transformer.proj_out_2.weight.dtype == dtype
    pipe.save_pretrained(tmp_path, variant=variant)
    for loader in (DiTOptimumPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path, torch_dtype=dtype, variant=variant)
        loaded.set_progress_bar_config(disable=True)
        for guidance in (1.0, 4.0):
            np.testing.assert_array_equal(images(loaded, guidance), images(pipe, guidance), err_msg=loader.__name__)
    assert pipe.to(torch.float32).transformer.pos_embed.pos_embed.dtype == torch.float32


def test_the_transformer_alone_keeps_the_package_format_unless_asked(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "package")
    assert json.loads((tmp_path / "package" / "config.json").read_text())["_class_name"] == (
        "DiTOptimumTransformer2DModel"
    )
    model.save_pretrained(tmp_path / "stock", stock_format=True, variant="fp16")
    assert (tmp_path / "stock" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = DiTOptimumTransformer2DModel.from_pretrained(tmp_path / "stock", variant="fp16")
    assert loaded.num_classes == 10
    sample, timestep, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([2, 1000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, timestep, labels).sample, model(sample, timestep, labels).sample)
    with pytest.raises(DiTOptimumError, match=r"attention_type='mediated'"):
        tiny_model(attention_type="mediated", num_mediators=4).save_pretrained(tmp_path / "x", stock_format=True)
    with pytest.raises(DiTOptimumError, match=r"`variant`='\.\./x'"):
        model.save_pretrained(tmp_path / "y", variant="../x")


def test_what_stock_diffusers_cannot_represent_keeps_the_package_format_with_a_reason(tmp_path):
    pruned_heads = prune(latent_pipeline(), heads=0.5)
    cases = {
        "mediated": (latent_pipeline(attention_type="mediated", num_mediators=4), r"attention_type='mediated'"),
        "gqa": (latent_pipeline(attention_type="gqa"), r"attention_type='gqa'"),
        "moe": (latent_pipeline(moe_num_experts=4, moe_top_k=2), r"mixture-of-experts"),
        "heads": (pruned_heads, r"per-layer widths `layer_heads`"),
        "mlp-ratio": (latent_pipeline(mlp_ratio=2.0), r"mlp_ratio=2\.0"),
        "original-timesteps": (latent_pipeline(original_timestep_embedding=True), "original DiT timestep"),
        "no-null-class": (latent_pipeline(class_dropout_prob=0.0), r"no null class"),
        "many-classes": (latent_pipeline(num_embeds_ada_norm=1200), r"num_embeds_ada_norm=1200"),
        "pixel-space": (tiny_pixel_pipeline(), r"pixel space"),
    }
    for name, (pipe, reason) in cases.items():
        problem = stock_format_problem(pipe)
        assert problem is not None and __import__("re").search(reason, problem), (name, problem)
    schedule = latent_pipeline()
    from dit_optimum import BlockCacheSchedule

    schedule.transformer.enable_cache(BlockCacheSchedule.from_dict({"num_inference_steps": 2, "reuse": [[], [1]]}))
    assert "block cache schedule" in stock_format_problem(schedule)
    static = quantize(
        latent_pipeline(),
        backend="quanto",
        weights="int8",
        activations="int8",
        calibration=__import__("dit_optimum").CalibrationSettings(num_batches=1, batch_size=1, num_inference_steps=1),
    )
    assert "quanto with activations" in stock_format_problem(static)
    # saved: the package format, and the card's reason read back from the folder
    cases["mediated"][0].save_pretrained(tmp_path / "mediated")
    index = json.loads((tmp_path / "mediated" / "model_index.json").read_text())
    assert index["transformer"] == ["dit_optimum", "DiTOptimumTransformer2DModel"]
    assert folder_stock_problem(tmp_path / "mediated") == stock_format_problem(cases["mediated"][0])
    with pytest.raises(DiTOptimumError, match=r"cannot be saved in diffusers' own format: .*pixel space"):
        tiny_pixel_pipeline().save_pretrained(tmp_path / "refused", stock_format=True)
    assert not (tmp_path / "refused").exists()
    for flag in (0, 1, "yes"):  # a flag is a bool (0 would have meant "any format")
        with pytest.raises(DiTOptimumError, match="`stock_format`="):
            latent_pipeline().save_pretrained(tmp_path / "flag", stock_format=flag)
        with pytest.raises(DiTOptimumError, match="`stock_format`="):
            tiny_model().save_pretrained(tmp_path / "flag", stock_format=flag)
    assert not (tmp_path / "flag").exists()
    latent_pipeline().save_pretrained(tmp_path / "asked", stock_format=False)
    assert json.loads((tmp_path / "asked" / "model_index.json").read_text())["transformer"][0] == "dit_optimum"
    code = loading_code("org/x", {"technique": "attention-mediated"}, folder_stock_problem(tmp_path / "mediated"))
    assert "# dit-optimum is needed to load this release: attention_type='mediated'" in code
    assert "import dit_optimum" in code


def test_cards_print_the_loading_line_that_works_for_each_format():
    from dit_optimum.hub.cards import model_card

    release = json.loads((Path(__file__).resolve().parents[1] / "model_cards" / "dit_optimum_results.json").read_text())
    int8 = next(row for row in release["rows"] if row["technique"] == "int8")
    stock = model_card(release, int8, "org/dit-xs4-int8", needs_package=None).text
    assert "import dit_optimum" not in stock and "plain diffusers loads it, dit-optimum is not needed" in stock
    assert 'DiffusionPipeline.from_pretrained("org/dit-xs4-int8", torch_dtype=torch.bfloat16)' in stock
    reason = "attention_type='mediated' (diffusers' DiT has standard softmax attention only)`\n```"
    package = model_card(release, int8, "org/dit-xs4-int8", needs_package=reason).text
    assert "# dit-optimum is needed to load this release: attention_type='mediated' (diffusers'" in package
    assert "import dit_optimum  # noqa: F401" in package and "It needs dit-optimum for: attention" in package
    assert package.count("```") == stock.count("```")  # the reason cannot close the code block
    # a torchao release names its dtype even in float32: diffusers would load it in bfloat16 otherwise
    dynamic = loading_code("org/x", {"technique": "int8-dynamic", "dtype": "float32"}, None)
    assert 'from_pretrained("org/x", torch_dtype=torch.float32)' in dynamic
