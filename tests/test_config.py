"""Typed configuration: defaults, presets, YAML layers, dotted overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from latentdiff.config import Config, ConfigError, load_config, save_config
from latentdiff.models import MODEL_PRESETS


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_layers_apply_in_order(tmp_path):
    base = write(tmp_path, "base.yaml", "output_dir: runs/a\ntrain:\n  max_steps: 100\n  batch_size: 32\n")
    top = write(tmp_path, "top.yaml", "train:\n  max_steps: 200\n")
    config = load_config([base, top], ["train.batch_size=16", "output_dir=runs/x"])
    assert isinstance(config, Config)
    assert config.train.max_steps == 200  # the later file wins
    assert config.train.batch_size == 16  # the command line wins over both
    assert config.output_dir == "runs/x"
    assert config.train.caption_dropout == Config().train.caption_dropout  # untouched keys keep defaults


def test_a_nested_override_keeps_its_sections_other_defaults():
    # stage 1's optimizer defaults to lr 1e-3 (not OptimizerConfig's 1e-4): overriding beta1 must not reset it
    config = load_config(overrides=["vae_train.optimizer.adam_beta1=0.8"])
    assert config.vae_train.optimizer.adam_beta1 == 0.8
    assert config.vae_train.optimizer.learning_rate == 1e-3


def test_the_model_preset_fills_the_model_section_and_explicit_keys_override_it(tmp_path):
    config = load_config(overrides=["model.preset=tiny"])
    assert config.model.unet == MODEL_PRESETS["tiny"].unet
    assert config.model.preset == "tiny"
    path = write(tmp_path, "c.yaml", "model:\n  preset: tiny\n  unet:\n    layers_per_block: 2\n")
    config = load_config(path)
    assert config.model.unet.layers_per_block == 2
    assert config.model.unet.block_out_channels == MODEL_PRESETS["tiny"].unet.block_out_channels


def test_command_line_values_are_typed():
    config = load_config(
        overrides=[
            "model.unet.block_out_channels=[32, 64]",
            "train.use_ema=false",
            "diffusion.snr_gamma=5",
            "diffusion.snr_gamma=null",
            "train.mixed_precision=no",  # YAML alone would read "no" as false
            "model.vae.pretrained=runs/x/vae",
            "sample.prompts=[a red circle, two blue squares]",
        ]
    )
    assert config.model.unet.block_out_channels == (32, 64)
    assert config.train.use_ema is False
    assert config.diffusion.snr_gamma is None
    assert config.train.mixed_precision == "no"
    assert config.model.vae.pretrained == "runs/x/vae"
    assert config.sample.prompts == ("a red circle", "two blue squares")
    assert load_config(overrides=["diffusion.snr_gamma=5"]).diffusion.snr_gamma == 5.0
    # YAML 1.1 reads 1e-3 (no dot) as text; a number field still takes it, on the command line and in files
    assert load_config(overrides=["train.optimizer.learning_rate=1e-3"]).train.optimizer.learning_rate == 1e-3
    assert load_config(overrides=["train.optimizer.learning_rate=2.5E-2"]).train.optimizer.learning_rate == 0.025


def test_a_number_without_a_dot_in_a_yaml_file_is_a_number(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  optimizer:\n    learning_rate: 5e-4\n")
    assert load_config(path).train.optimizer.learning_rate == 5e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"),
        (["trian.max_steps=3"], "unknown config key 'trian'"),
        (["train.max_steps=abc"], "config key 'train.max_steps': expected an integer, got 'abc'"),
        (["train.max_steps=2.5"], "config key 'train.max_steps': expected an integer, got 2.5"),
        (["train.optimizer.learning_rate=1e-3x"], "config key 'train.optimizer.learning_rate': expected a number"),
        (["train.use_ema=maybe"], "config key 'train.use_ema': expected true or false"),
        (["diffusion.prediction_type=noise"], "config key 'diffusion.prediction_type': expected one of 'epsilon'"),
        (["model.preset=huge"], "model.preset: unknown preset 'huge'"),
        (["model.unet.block_out_channels=64"], "config key 'model.unet.block_out_channels': expected a list of int"),
        (["train=3"], "'train' is a section"),
        (["max_steps"], "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=overrides)
    assert message in str(error.value)


def test_bad_yaml_files_name_the_key_and_the_file(tmp_path):
    misspelled = write(tmp_path, "misspelled.yaml", "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"misspelled.yaml: unknown config key 'train.learning_rate'"):
        load_config(misspelled)
    wrong_type = write(tmp_path, "wrong.yaml", "data:\n  resolution: sixty-four\n")
    with pytest.raises(ConfigError, match=r"'data.resolution': expected an integer, got 'sixty-four'"):
        load_config(wrong_type)
    not_a_mapping = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(not_a_mapping)


def test_the_saved_config_reads_back_to_the_same_config(tmp_path):
    config = load_config(overrides=["model.preset=tiny", "train.max_steps=7", "data.shapes.holdout=[purple triangle]"])
    path = save_config(config, tmp_path)
    assert load_config(path) == config


def test_every_shipped_config_resolves():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)


def test_the_patient_cpu_preset_is_the_default_recipe_with_more_images():
    """configs/shapes-patient.yaml measures what more images seen buy (forty-sixth round): it is written over
    configs/shapes.yaml (``base``) and must not drift from the default in anything else."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    default, patient = load_config(configs / "shapes.yaml"), load_config(configs / "shapes-patient.yaml")
    # twice the stage-2 steps of the default it was measured beside (3,400, before the forty-eighth round) on twice
    # the scenes: each scene seen as often as in that default
    assert patient.train.max_steps == 2 * 3400
    assert patient.data.shapes.num_samples == 2 * default.data.shapes.num_samples
    # the token mixing starts half-way through stage 2 in both
    assert default.train.token_mixing_from_step * 2 == default.train.max_steps
    assert patient.train.token_mixing_from_step * 2 == patient.train.max_steps
    changed = {"max_steps": patient.train.max_steps, "token_mixing_from_step": patient.train.token_mixing_from_step,
               "mixed_precision": "no", "compile": False}  # as measured; the default's bf16 and compiled U-Net are
    # unmeasured at this budget
    assert patient.train == dataclasses.replace(default.train, **changed)
    assert patient.vae_train == dataclasses.replace(default.vae_train, mixed_precision="no")
    shapes = dataclasses.replace(default.data.shapes, num_samples=patient.data.shapes.num_samples)
    assert patient.data == dataclasses.replace(default.data, shapes=shapes)
    assert patient.output_dir != default.output_dir
    # its sampling as measured: the default's without the background phrase carried into the negative prompt
    assert patient.sample == dataclasses.replace(default.sample, negative_prompt_carry=None)
    assert dataclasses.replace(patient, output_dir=default.output_dir, data=default.data, train=default.train,
                               vae_train=default.vae_train, sample=default.sample) == default


def test_a_config_file_applies_over_its_base_file(tmp_path):
    """``base: OTHER.yaml`` (relative to the file) is loaded first, recursively; the file's keys, then the command
    line's, win."""
    (tmp_path / "presets").mkdir()
    (tmp_path / "root.yaml").write_text("output_dir: runs/root\ntrain:\n  max_steps: 100\n  batch_size: 8\n")
    (tmp_path / "presets" / "middle.yaml").write_text("base: ../root.yaml\ntrain:\n  max_steps: 200\n")
    (tmp_path / "presets" / "leaf.yaml").write_text("base: middle.yaml\noutput_dir: runs/leaf\n")
    config = load_config(tmp_path / "presets" / "leaf.yaml")
    assert (config.output_dir, config.train.max_steps, config.train.batch_size) == ("runs/leaf", 200, 8)
    assert load_config(tmp_path / "presets" / "leaf.yaml", ["train.batch_size=4"]).train.batch_size == 4


@pytest.mark.parametrize(
    "text, match",
    [
        ("base: missing.yaml\n", "its base file 'missing.yaml' does not exist"),
        ("base: [a.yaml]\n", "base must be the path of another config file"),
        ("base: self.yaml\n", "its base files form a cycle"),
    ],
)
def test_a_bad_base_file_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "self.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "self.yaml")


def test_the_gpu_preset_trains_with_the_default_objective():
    """configs/shapes-long.yaml is the default's recipe scaled up: a bigger model and budget, the same objective."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    default, long = load_config(configs / "shapes.yaml"), load_config(configs / "shapes-long.yaml")
    assert long.diffusion == default.diffusion
    assert long.low_noise_expert.boundary == default.low_noise_expert.boundary and long.low_noise_expert.max_steps > 0
    # the same conditioning routes: the caption by cross-attention only, AdaGN for the timestep
    for key in ("addition_embed_type", "resnet_time_scale_shift"):
        assert getattr(long.model.unet, key) == getattr(default.model.unet, key)
    assert long.data.shapes.holdout == default.data.shapes.holdout
    assert long.train.max_steps > default.train.max_steps and long.data.shapes.num_samples > default.data.shapes.num_samples
    # the same text path: word and position embeddings, and the mix of the word before each word, switched on at the
    # same fraction of the run (forty-second round: trained from the start, the mix lost places)
    for key in ("num_hidden_layers", "token_mixing_width", "token_mixing_gated", "token_mixing_depthwise"):
        assert getattr(long.model.text_encoder, key) == getattr(default.model.text_encoder, key)
    long_start = long.train.token_mixing_from_step / long.train.max_steps
    assert long_start == pytest.approx(default.train.token_mixing_from_step / default.train.max_steps, abs=0.01)
    # and the token loss on the objects' places at the default's weight (forty-fourth round)
    assert long.train.attention_localization_weight == default.train.attention_localization_weight > 0
    # and the default's sampling: guidance 3.5 away from "a shape" below t = 800 (eighth round)
    assert long.sample == default.sample


def test_the_scale_equivariance_factor_must_divide_every_latent_edge_stage_1_trains_on():
    assert load_config(overrides=["vae_train.scale_equivariance_weight=0.5"]).vae_train.scale_equivariance_factor == 2
    load_config(overrides=["vae_train.scale_equivariance_factor=3"])  # unused while the weight is 0
    message = "config key 'vae_train.scale_equivariance_factor': expected a divisor of the latent edge 4 (vae_train.crop_size=16"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["vae_train.scale_equivariance_weight=0.5", "vae_train.crop_size=16", "vae_train.scale_equivariance_factor=8"])


def test_the_background_phrase_joins_the_token_losses_only_when_one_is_on():
    message = "config key 'train.attention_localization_background': expected false unless train.attention_localization_weight"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["train.attention_localization_weight=0", "train.attention_localization_background=true"])
    shapes = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # the token loss on
    assert load_config(shapes, ["train.attention_localization_background=true"]).train.attention_localization_background


def test_a_negative_prompt_carry_that_is_no_regular_expression_is_refused():
    message = "config key 'sample.negative_prompt_carry': expected a regular expression"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["sample.negative_prompt_carry=(background"])
    assert load_config(overrides=["sample.negative_prompt_carry= on a"]).sample.negative_prompt_carry == " on a"


def test_the_config_command_prints_the_resolved_config_or_one_line_error():
    ok = subprocess.run([sys.executable, "-m", "latentdiff.cli", "config", "train.max_steps=3"], capture_output=True, text=True)
    assert ok.returncode == 0 and "max_steps: 3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "latentdiff.cli", "config", "train.max_stepz=3"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "unknown config key 'train.max_stepz'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        # the gaps named in the issue, then one of each kind of range
        ("train.max_steps=-5", "config key 'train.max_steps': expected an integer >= 1, got -5"),
        ("train.caption_dropout=2.0", "config key 'train.caption_dropout': expected a number in [0, 1), got 2.0"),
        ("data.resolution=-32", "config key 'data.resolution': expected an integer >= 1, got -32"),
        ("train.ema_decay=1.5", "config key 'train.ema_decay': expected a number in (0, 1), got 1.5"),
        ("diffusion.snr_gamma=-1", "config key 'diffusion.snr_gamma': expected a number > 0, got -1.0"),
        ("train.report_to=comet", "config key 'train.report_to': expected one of 'tensorboard', 'wandb', 'all', 'none'"),
        ("train.optimizer.lr_scheduler=nonsense", "config key 'train.optimizer.lr_scheduler': expected one of 'linear'"),
        ("train.mixed_precision=fp32", "config key 'train.mixed_precision': expected one of 'no', 'fp16', 'bf16'"),
        ("vae_train.batch_size=0", "config key 'vae_train.batch_size': expected an integer >= 1, got 0"),
        ("train.optimizer.learning_rate=0", "config key 'train.optimizer.learning_rate': expected a number > 0, got 0.0"),
        ("train.optimizer.learning_rate=.nan", "config key 'train.optimizer.learning_rate': expected a finite number, got nan"),
        ("train.optimizer.adam_beta2=1.0", "config key 'train.optimizer.adam_beta2': expected a number in [0, 1), got 1.0"),
        ("train.optimizer.max_grad_norm=0", "config key 'train.optimizer.max_grad_norm': expected a number > 0, got 0.0"),
        ("vae_train.kl_weight=-1e-6", "config key 'vae_train.kl_weight': expected a number >= 0, got -1e-06"),
        ("train.checkpoints_total_limit=0", "config key 'train.checkpoints_total_limit': expected an integer >= 1, got 0"),
        ("seed=-1", "config key 'seed': expected an integer in [0, 4294967295], got -1"),
        ("sample.prompts=[]", "config key 'sample.prompts': expected a non-empty list, got []"),
        ("model.unet.block_out_channels=[32, 0]", "config key 'model.unet.block_out_channels': expected a list of integers >= 1"),
        # relations between fields
        ("data.resolution=66", "config key 'data.resolution': expected a positive multiple of 4, the autoencoder's downsampling"),
        ("vae_train.crop_size=128", "config key 'vae_train.crop_size': expected a multiple of the autoencoder's downsampling factor 4"),
        ("diffusion.beta_end=0.0001", "config key 'diffusion.beta_end': expected more than diffusion.beta_start=0.00085, got 0.0001"),
        ("data.shapes.min_objects=3", "config key 'data.shapes.max_objects': expected at least data.shapes.min_objects=3, got 2"),
        ("data.shapes.mixture.relation=-0.5", "config key 'data.shapes.mixture.relation': expected a number >= 0, got -0.5"),
        ("model.text_encoder.hidden_size=130", "config key 'model.text_encoder.hidden_size': expected a multiple of model.text_encoder.num_attention_heads=4"),
        ("model.vae.norm_num_groups=24", "config key 'model.vae.block_out_channels': expected multiples of model.vae.norm_num_groups=24"),
        ("sample.guidance_interval=[600, 0]", "config key 'sample.guidance_interval': expected null or [low, high] timesteps with 0 <= low <= high, got [600.0, 0.0]"),
        ("sample.guidance_interval=[0, 300, 600]", "config key 'sample.guidance_interval': expected null or [low, high] timesteps with 0 <= low <= high, got [0.0, 300.0, 600.0]"),
        ("sample.guidance_interval=[-1, 600]", "config key 'sample.guidance_interval': expected a list of numbers >= 0"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_what_is_allowed(override, message):
    overrides = [override] + (["data.shapes.max_objects=2"] if "min_objects" in override else [])
    with pytest.raises(ConfigError) as error:
        load_config(overrides=overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_scene_mixture_without_weight_is_refused():
    zero = [f"data.shapes.mixture.{kind}=0" for kind in ("single", "count", "relation", "multi")]
    with pytest.raises(ConfigError, match=r"'data.shapes.mixture': expected a positive weight for at least one scene kind"):
        load_config(overrides=zero)
    assert load_config(overrides=zero[:3]).data.shapes.mixture.multi == 0.15


def test_the_edges_of_each_range_are_accepted():
    config = load_config(
        overrides=[
            "train.caption_dropout=0", "diffusion.noise_offset=0", "train.checkpointing_steps=0",
            "train.validation_steps=0", "model.text_encoder.num_hidden_layers=0", "train.optimizer.adam_beta1=0",
            "seed=4294967295", "vae_train.optimizer.max_grad_norm=null", "diffusion.snr_gamma=null",
            "data.resolution=4", "model.pixel_space=true",
        ]
    )
    assert config.train.caption_dropout == 0 and config.seed == 2**32 - 1
    # a pixel-space model has no autoencoder factor; a pretrained one is checked when it is loaded
    assert load_config(overrides=["model.pixel_space=true", "data.resolution=30"]).data.resolution == 30
    assert load_config(overrides=["model.vae.pretrained=runs/x/vae", "data.resolution=30"]).data.resolution == 30


def test_every_number_field_has_a_range():
    """A new numeric field without an entry in VALUE_RULES would take any value silently."""
    import dataclasses
    import typing

    from latentdiff.config import VALUE_RULES

    def numeric_fields(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            annotation = hints[f.name]
            if dataclasses.is_dataclass(annotation):
                yield from numeric_fields(annotation)
                continue
            flat = set()
            for argument in typing.get_args(annotation) or (annotation,):
                flat |= set(typing.get_args(argument) or (argument,))
            if flat & {int, float}:
                yield cls, f.name

    missing = [f"{cls.__name__}.{name}" for cls, name in numeric_fields(Config) if name not in VALUE_RULES.get(cls, {})]
    assert not missing, missing


def test_the_name_lists_match_the_libraries():
    import typing

    from accelerate.utils import LoggerType, PrecisionType
    from diffusers.optimization import SchedulerType

    from latentdiff.config import LRSchedulerName, MixedPrecision, SchedulerName, TrackerName
    from latentdiff.schedulers import SCHEDULER_NAMES

    # piecewise_constant needs step_rules, which the config has no field for
    assert set(typing.get_args(LRSchedulerName)) == {s.value for s in SchedulerType} - {"piecewise_constant"}
    assert set(typing.get_args(TrackerName)) == {t.value for t in LoggerType} | {"none"}
    # fp8 needs an extra backend (Transformer Engine, MS-AMP or torchao) and an fp8-capable GPU
    assert set(typing.get_args(MixedPrecision)) == {p.value for p in PrecisionType} - {"fp8"}
    assert set(typing.get_args(SchedulerName)) == set(SCHEDULER_NAMES)


def test_the_object_count_range_is_the_shapes_generators():
    from latentdiff.config import VALUE_RULES, ShapesConfig
    from latentdiff.data.shapes import MAX_OBJECTS

    assert VALUE_RULES[ShapesConfig]["max_objects"].high == VALUE_RULES[ShapesConfig]["min_objects"].high == MAX_OBJECTS


def test_the_config_module_imports_no_deep_learning_library():
    code = "import sys, latentdiff.config; print(sorted({'torch', 'diffusers', 'transformers', 'accelerate'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_an_out_of_range_value_on_the_command_line_is_one_line_and_status_2():
    bad = subprocess.run(
        [sys.executable, "-m", "latentdiff.cli", "config", "train.max_steps=-5"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "latentdiff config: error: config key 'train.max_steps': expected an integer >= 1, got -5"
