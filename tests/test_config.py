"""RunConfig's model: a registry name or None (VGG-`depth`), one spelling per model, and the
rule that joins it with `depth`."""
import dataclasses

import pytest

from attenuation.config import RunConfig, baseline_id, preset_config
from attenuation.models import available_models


def test_no_model_is_the_vgg_of_depth():
    assert preset_config("smoke").model_name == "vgg11"
    assert preset_config("quick").model_name == "vgg16"
    assert preset_config("quick", depth=13).model_name == "vgg13"


def test_a_named_model_replaces_the_presets_depth():
    config = preset_config("smoke", model="resnet20")  # the smoke preset's depth is 11
    assert (config.model, config.depth, config.model_name) == ("resnet20", 16, "resnet20")
    assert preset_config("smoke", model="vgg16").model_name == "vgg16"


@pytest.mark.parametrize("depth", [13, 16])
def test_a_vgg_name_is_spelt_as_its_depth(depth):
    """model="vgg13" and depth=13 are one configuration: equal, with one baseline."""
    named = preset_config("quick", model=f"vgg{depth}")
    assert (named.model, named.depth) == (None, depth)
    assert named == preset_config("quick", depth=depth)
    assert baseline_id(named) == baseline_id(preset_config("quick", depth=depth))
    assert preset_config("quick", model="vgg13", depth=13) == preset_config("quick", depth=13)


def test_the_model_is_part_of_the_baseline():
    ids = {baseline_id(preset_config("smoke", model=name)) for name in available_models()}
    assert len(ids) == len(available_models())


@pytest.mark.parametrize("overrides, message", [
    (dict(model="resnet20", depth=11), "depth 11 applies to VGGs only: model resnet20 takes none"),
    (dict(model="resnet56b", depth=19), "depth 19 applies to VGGs only"),
    (dict(model="vgg13", depth=11), "model vgg13 contradicts depth 11"),
    (dict(model="resnet18"), "unknown model 'resnet18': available are resnet20, resnet20b, resnet56, "
                             "resnet56b, vgg11, vgg13, vgg16, vgg19"),
    (dict(depth=10), "unknown depth 10 (model vgg10): available are resnet20"),
])
def test_model_and_depth_that_disagree_are_refused(overrides, message):
    with pytest.raises(ValueError) as error:
        preset_config("quick", **overrides)
    assert message in str(error.value)


def test_a_model_that_is_not_a_string_is_refused():
    with pytest.raises(TypeError, match="model must be str or None, got 20"):
        RunConfig(model=20).validate()


def test_validation_is_idempotent():
    for name in available_models():
        config = preset_config("smoke", model=name)
        assert RunConfig(**config.to_dict()).validate() == config
        assert dataclasses.replace(config).validate().model_name == name
