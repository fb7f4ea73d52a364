"""Optimizers (AdamW, 8-bit AdamW, Prodigy), their parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import argparse
import logging

import torch

from .errors import InputError

logger = logging.getLogger(__name__)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(
    args: argparse.Namespace, unet_params: dict[float, list], text_encoder_params: list
) -> list[dict]:
    """UNet parameters at --learning_rate times their block's scale ({scale: params}, see --unet_block_lr);
    text-encoder parameters at --text_encoder_lr with their own decay.

    Prodigy estimates one step size for all groups; as in the reference, its text-encoder group then uses
    --learning_rate as well.
    """
    groups = [
        {"params": params, "lr": args.learning_rate * scale, "weight_decay": args.adam_weight_decay}
        for scale, params in unet_params.items()
    ]
    if text_encoder_params:
        lr = args.learning_rate if args.optimizer == "prodigy" else args.text_encoder_lr
        decay = args.adam_weight_decay_text_encoder
        groups.append(
            {
                "params": text_encoder_params,
                "lr": lr,
                "weight_decay": args.adam_weight_decay if decay is None else decay,
            }
        )
    return groups


def create_optimizer(args: argparse.Namespace, groups: list[dict]) -> torch.optim.Optimizer:
    betas = (args.adam_beta1, args.adam_beta2)
    fused = args.adam_fused
    if fused and (args.use_8bit_adam or args.optimizer == "prodigy"):
        raise InputError("--adam_fused is torch's AdamW kernel: not with --use_8bit_adam or --optimizer prodigy.")
    if args.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise ImportError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from error
        return Prodigy(
            groups,
            lr=args.learning_rate,
            betas=betas,
            beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError(
                "--use_8bit_adam needs bitsandbytes (CUDA): pip install bitsandbytes, or drop the flag."
            ) from error
        optimizer_class = bnb.optim.AdamW8bit
        options = {}
    else:
        optimizer_class = torch.optim.AdamW
        options = {"fused": True} if fused else {}
    return optimizer_class(
        groups,
        lr=args.learning_rate,
        betas=betas,
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **options,
    )


def create_lr_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedules, stepped once per optimizer step (the trainer does not let accelerate wrap it)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        step_rules=args.lr_step_rules,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
