"""The DreamBooth trainer's command line: diffusers' argument names and meanings where they exist, our methods'
settings beside them, and the diffusers flags it does not take, each refused with the reason."""

import argparse
from pathlib import Path

import psoft_vision as pv

from ..common.hub import add_hub_args
from ..common.methods import add_config_flags, default_lr, default_lrs, method_choices, size_pattern_fields
from ..common.paths import TINY_T2I, run_folder_problem
from .diffusion import WEIGHTING_SCHEMES
from .errors import DreamBoothError
from .optim import SCHEDULES
from .ranks import parse_pattern
from .subject import DEFAULT_CLASS_PROMPT, DEFAULT_INSTANCE_PROMPT, SUBJECT_DIR

DEFAULT_PIPELINE = TINY_T2I
DEFAULT_SUBJECT = SUBJECT_DIR / "train"
#: The trainer's own methods beside every registered one (see train/common/methods.py).
BASELINES = ("lora",)
#: The learning rate of each baseline; a registered method's is its ``learning_rates["dreambooth"]`` (psoft_vision's
#: Method). These, and the default sizes below (--rank, --block_size, --lora_rank), are the best of the search on the
#: offline pipeline (train/dreambooth/search.py, docs/dreambooth_search.md), but for LoRA's rank: r=16 searched a
#: little better than r=4 at this rate and diverged in 1 of the comparison's 9 runs (docs/dreambooth_offline.md).
BASELINE_LR = {"lora": 1.58e-2}
#: The learning rate of a registered method that names none for DreamBooth: what ours were trained with.
FALLBACK_LR = 1e-2

#: diffusers' DreamBooth flags this trainer does not take, and why (shown by --help; passing one is a named error).
UNSUPPORTED = {
    "--dataset_name": "images come from --instance_data_dir (a folder); no datasets library",
    "--dataset_config_name": "images come from --instance_data_dir",
    "--image_column": "images come from --instance_data_dir",
    "--caption_column": "one --instance_prompt for every image",
    "--repeats": "batches are drawn at random from the images; more steps replace repeats",
    "--center_crop": "images are always centre-cropped (a random crop is not offered)",
    "--num_train_epochs": "training length is --max_train_steps",
    "--checkpoints_total_limit": "one checkpoint is kept, replaced whole at every --checkpointing_steps",
    "--scale_lr": "give the learning rate you want",
    "--lr_num_cycles": "cosine_with_restarts is not offered",
    "--lr_power": "polynomial is not offered",
    "--dataloader_num_workers": "images are loaded and encoded once before training",
    "--optimizer": "AdamW (or --use_8bit_adam); Prodigy is not offered",
    "--prodigy_beta3": "Prodigy is not offered", "--prodigy_decouple": "Prodigy is not offered",
    "--prodigy_use_bias_correction": "Prodigy is not offered", "--prodigy_safeguard_warmup": "Prodigy is not offered",
    "--adam_weight_decay_text_encoder": "one --adam_weight_decay for every parameter",
    "--prior_generation_precision": "class images are generated in the pipeline's training precision",
    "--upcast_before_saving": "adapters are saved in fp32 always",
    "--enable_xformers_memory_efficient_attention": "diffusers uses PyTorch's scaled_dot_product_attention",
    "--pre_compute_text_embeddings": "prompts are encoded once unless --train_text_encoder",
    "--tokenizer_max_length": "the tokenizer's own length (T5 / Gemma: --max_sequence_length)",
    "--text_encoder_use_attention_mask": "encode_prompt of the pipeline decides",
    "--class_labels_conditioning": "no class-conditioned UNets",
    "--noise_offset": "not offered", "--snr_gamma": "not offered (flow matching: --weighting_scheme)",
    "--use_dora": "DoRA is not offered; --method psoft | oft | lora",
    "--lora_dropout": "not offered",
    "--do_fp8_training": "not offered",
    "--crops_coords_top_left_h": "SDXL time ids use each image's own centre crop",
    "--crops_coords_top_left_w": "SDXL time ids use each image's own centre crop",
    "--train_text_encoder_ti": "pivotal tuning is not offered", "--train_text_encoder_frac": "not offered",
    "--image_interpolation_mode": "images are resized with bicubic interpolation",
}


class Unsupported(argparse.Action):
    """A diffusers flag we do not take: a DreamBoothError with the reason instead of argparse's generic error."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise DreamBoothError(f"{option_string} (a flag of diffusers' DreamBooth scripts) is not supported here: "
                              f"{UNSUPPORTED[option_string]}. See --help for what is.")


def epilog() -> str:
    lines = [f"  {flag}: {why}" for flag, why in UNSUPPORTED.items()]
    return "diffusers flags not supported here (passing one is an error that says why):\n" + "\n".join(lines)


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (diffusers' names)")
    g.add_argument("--pretrained_model_name_or_path", default=str(DEFAULT_PIPELINE),
                   help="a diffusers pipeline: a hub id (org/name) or a local folder; Stable Diffusion 1.x/2.x, SDXL, "
                        "SD3/SD3.5, Flux.1 or Sana (default: the project's assets/tiny-t2i)")
    g.add_argument("--revision", help="the hub revision (branch, tag or commit) of the pipeline")
    g.add_argument("--variant", help="the weights variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.*)")
    g.add_argument("--cache_dir", help="the hub cache to download into and read from (default: huggingface_hub's, "
                   "HF_HUB_CACHE or HF_HOME)")
    g.add_argument("--instance_data_dir", type=Path, default=DEFAULT_SUBJECT, help="images of the subject")
    g.add_argument("--instance_prompt", default=DEFAULT_INSTANCE_PROMPT)
    g.add_argument("--class_data_dir", type=Path, help="class images; missing ones are generated "
                   "(default <output_dir>/class_images)")
    g.add_argument("--class_prompt", default=DEFAULT_CLASS_PROMPT)
    g.add_argument("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=True,
                   help="add the class prompt's images to every batch (on by default here)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=64)
    g.add_argument("--sample_batch_size", type=int, default=16, help="batch size for generating class images")
    g.add_argument("--resolution", type=int, help="training resolution (default: the pipeline's native size)")
    g.add_argument("--random_flip", action="store_true", help="add horizontally flipped copies of the images")
    g.add_argument("--max_sequence_length", type=int, help="T5 / Gemma prompt length (SD3, Flux, Sana; default: the "
                   "pipeline's)")
    g.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=True,
                   help="encode the images with the VAE once (default); --no-cache_latents encodes each batch")


def _method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="psoft", help=f"one of {', '.join(method_choices(BASELINES))} (lora: PEFT, "
                   "diffusers' way)")
    g.add_argument("--rank", type=int, default=32, help="PSOFT rank r")
    g.add_argument("--rank_pattern", help="ranks per module type or module, e.g. attn=32,ff=8 (types: attn, ff, "
                   "proj; or a module name or dotted suffix): PSOFT's rank, or LoRA's with --method lora")
    g.add_argument("--block_size", type=int, default=16, help="OFTv2 block size")
    g.add_argument("--block_size_pattern", help="OFTv2 block sizes per module type or module, as --rank_pattern")
    g.add_argument("--lora_rank", type=int, default=4, help="PEFT LoRA rank (alpha = rank)")
    g.add_argument("--quantize", choices=tuple(pv.quantized.SCHEMES),
                   help="quantize the denoiser's linear layers before the adapters (QPSOFT / QOFT; with --method "
                        "lora, QLoRA): psoft_vision.quantize_base, bitsandbytes or torchao (the quant extra)")
    g.add_argument("--lora_layers", help="only these of the denoiser's --targets layers, for every method: "
                   "comma-separated types (attn, ff, proj) or ends of layer names (to_k,to_q,to_v,to_out.0)")
    g.add_argument("--targets", default="auto", choices=["auto", *sorted(pv.PRESETS)],
                   help="the denoiser's target preset (auto: the diffusers preset)")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="adapters on the text encoders the pipeline's load_lora_weights reads back too (SD: CLIP; "
                        "SDXL and SD3: both CLIPs; Flux: CLIP; never T5 or Gemma), on the transformers preset")
    g.add_argument("--text_encoder_lr", type=float, help="learning rate of the text encoders' adapters (default: "
                   "--learning_rate)")


def _optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (diffusers' names)")
    g.add_argument("--train_batch_size", type=int, default=4, help="instance images per micro-batch (and as many "
                   "class images with prior preservation)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimiser step; --max_train_steps counts optimiser steps")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass (the denoiser's and trained text encoders')")
    g.add_argument("--max_train_steps", type=int, default=400)
    g.add_argument("--learning_rate", type=float, help="default per method: "
                   f"{default_lrs('dreambooth', BASELINE_LR)}, else {FALLBACK_LR:g}")
    g.add_argument("--lr_scheduler", default="cosine", choices=SCHEDULES,
                   help="(warm-up counts the step being taken: see train/dreambooth/optim.py)")
    g.add_argument("--lr_warmup_steps", type=int, default=20)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (tensors under 4096 "
                   "numbers, such as PSOFT's q below rank 91, keep 32-bit state)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, help="clip the gradient norm (diffusers' default is 1.0; off here)")
    g.add_argument("--prediction_type", choices=("epsilon", "v_prediction"),
                   help="training target (default: the scheduler's prediction_type)")
    g.add_argument("--weighting_scheme", default="none", choices=WEIGHTING_SCHEMES,
                   help="flow matching: how s is sampled (logit_normal, mode) or the loss weighted (sigma_sqrt, "
                        "cosmap)")
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--precondition_outputs", type=int, default=0, choices=(0, 1),
                   help="flow matching: 1 learns x_0 = noisy - s * prediction (diffusers' SD3 trainer default); 0 "
                        "the flow noise - x_0 (its Flux and Sana trainers)")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast, and the frozen weights in half precision (the VAE kept in fp32 where its config "
                        "says force_upcast, under fp16)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs (no effect on CPU)")
    g.add_argument("--seed", type=int, default=0)


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", type=Path, help="default runs/dreambooth/<method>")
    g.add_argument("--checkpointing_steps", type=int, default=100)
    g.add_argument("--resume_from_checkpoint", help='"latest" (the output folder\'s checkpoint) or a checkpoint folder')
    g.add_argument("--stop_after_steps", type=int, help="end this run after N more steps; resume continues it")
    g.add_argument("--validation_prompt", help="default: the instance prompt")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=100, help="a validation grid every N steps and at the end")
    g.add_argument("--validation_epochs", type=int, help="a validation grid every N epochs (passes over the data, "
                   "as diffusers counts them) instead of --validation_steps")
    g.add_argument("--num_inference_steps", type=int, default=25)
    g.add_argument("--guidance_scale", type=float, default=3.0, help="validation guidance; Flux's guidance "
                   "embedding in training too (as diffusers' Flux trainer)")
    g.add_argument("--report_to", default="none", choices=("none", "tensorboard"),
                   help="tensorboard: loss, learning rate and validation images under <output_dir>/<logging_dir>")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch passes it
    g.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_hub_args(p.add_argument_group("hub (the output folder, with its README.md model card, is the repository)"),
                 dashed=False)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.dreambooth", description=description, epilog=epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_data_args, _method_args, _optim_args, _run_args):
        add(p)
    add_config_flags(p, dashed=False, text_patterns=True)  # read per module type, as --rank_pattern
    for flag in UNSUPPORTED:
        p.add_argument(flag, action=Unsupported)
    return p


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    args = build_parser(description).parse_args(argv)
    choices = method_choices(BASELINES)
    if args.method not in choices:
        raise DreamBoothError(f"--method {args.method!r} is unknown; choose one of {', '.join(choices)}.")
    if args.output_dir is None:
        args.output_dir = Path("runs/dreambooth") / args.method
    problem = run_folder_problem(Path(args.output_dir))
    if problem:
        raise DreamBoothError(f"--output_dir {str(args.output_dir)!r}: {problem}; pass a folder path (it is created "
                              "if missing).")
    if args.class_data_dir is None:
        args.class_data_dir = args.output_dir / "class_images"
    if args.learning_rate is None:
        args.learning_rate = default_lr(args.method, "dreambooth", BASELINE_LR, FALLBACK_LR)
    if args.validation_prompt is None:
        args.validation_prompt = args.instance_prompt
    for name in ("max_train_steps", "train_batch_size", "checkpointing_steps", "validation_steps",
                 "num_class_images", "sample_batch_size", "gradient_accumulation_steps", "validation_epochs",
                 "max_sequence_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DreamBoothError(f"--{name} must be at least 1, got {value}.")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise DreamBoothError(f"--max_grad_norm must be positive, got {args.max_grad_norm}; leave it out for none.")
    for flag in dict.fromkeys(("rank_pattern", *size_pattern_fields())):  # named errors before anything loads
        parse_pattern(getattr(args, flag, None), f"--{flag}")
    return args
