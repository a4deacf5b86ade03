"""One engine-aware way to write a stage's final model (and PPO's policy snapshots, pretraining's checkpointed
model), used by all four stages on every engine: every process takes part in gathering the weights (a collective
under ZeRO-3 and FSDP2), the main process loads them into a CPU copy of the architecture (a LoRA adapter merged
into the copy, never into the model that trains on), and writes an HF directory renamed into place atomically.

Read from the libraries: `accelerator.get_state_dict` gathers under ZeRO-3 only when given the DeepSpeed engine
(the custom loops' prepared model; a Trainer's `model_wrapped`), and returns None on every process but the main
one; under FSDP2 it all-gathers every DTensor into a full CPU state dict on the main process.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline.train.engines import engine_of


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module, part: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every process calls it: the whole state dict of a prepared model (a DeepSpeed engine under DeepSpeed) on
    the main process, an empty one elsewhere; `part` keeps one submodule's entries, its prefix stripped."""
    state = accelerator.get_state_dict(model) or {}  # ZeRO-3: DeepSpeed returns None off the main process
    if not accelerator.is_main_process:
        return {}
    if part is None:
        return state
    prefix = f"{part}."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def model_holding(state: dict[str, torch.Tensor], model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Main process only: a model of `model`'s class (LoRA adapter included) holding `state`: `model` itself where
    its weights are whole on this process and it has no adapter, else a fresh CPU copy (ZeRO-3, FSDP2, LoRA)."""
    adapter = getattr(model, "peft_config", None) is not None
    if engine_of(accelerator).shards_weights:
        model = cpu_copy_of_architecture(model)
    elif adapter:
        model = copy.deepcopy(model).to("cpu")  # merging folds the adapter in: never in the model that trains
    else:
        return model
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    result = model.load_state_dict(state, strict=False)
    # A gathered state dict may name a tied weight once; the copy ties it again.
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the gathered weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    return model


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's fully_shard swaps a module's class for a subclass `FSDP<Name>`."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def cpu_copy_of_architecture(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU model of `model`'s class and config (causal LM or sequence classifier), with its LoRA adapter
    if it has one, for one process to load a gathered state dict into. transformers would build it partitioned
    (deepspeed.zero.Init, a collective) while a ZeRO-3 config is registered, so the registration is lifted
    meanwhile."""
    adapter = getattr(model, "peft_config", None)
    base = model.get_base_model() if adapter else model
    with zero3_init_lifted():
        copy_ = unsharded_class(base)._from_config(base.config, dtype=torch.float32)
    if adapter:
        from peft import get_peft_model

        copy_ = get_peft_model(copy_, adapter["default"])
    return copy_


@contextlib.contextmanager
def zero3_init_lifted() -> Iterator[None]:
    """While a ZeRO-3 config is registered, transformers builds and loads every model partitioned under
    deepspeed.zero.Init, a collective: one process alone loading a model (to measure or to save it) would wait for
    the others forever. Lifted for the block, registered again after it. A no-op on other engines."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from accelerate.state import AcceleratorState
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, directory: Path,
                     part: str | None = None, adapter_only: bool = False) -> None:
    """Every process calls it: the prepared model's weights (or its `part`) gathered, then written by the main
    process as an HF directory that plain transformers loads: a LoRA adapter merged into a CPU copy, or, with
    `adapter_only`, the adapter alone. Renamed into place atomically; all processes leave together."""
    from pipeline.run.files import atomic_directory

    state = full_state_dict(accelerator, model, part)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        target = model_holding(state, getattr(unwrapped, part) if part else unwrapped, accelerator)
        with atomic_directory(directory) as staging:
            if adapter_only or not hasattr(target, "merge_and_unload"):
                target.save_pretrained(staging, safe_serialization=True)
            else:
                target.merge_and_unload().save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    accelerator.wait_for_everyone()
