"""The ``elbokto`` command line. Flags come from the config dataclasses (HfArgumentParser).

elbokto train           ELBO-KTO on a preference dataset (torchrun / accelerate launch for
                        several GPUs); --online: on the policy's own samples of a prompt
                        dataset, labelled by a judge or a verifier (--labeller)
elbokto precompute-ref  reference ELBOs of a dataset, for training without a reference model
elbokto generate        sample responses with the reverse diffusion process (JSON lines)
elbokto diagnose        Psi(S), v(S), c(S) of several Monte-Carlo settings
elbokto merge           a LoRA adapter folder merged into its base model (a full model)
elbokto demo            the judge-free CPU demonstration (make demo)
elbokto eval            win rates judged by an LLM, lm-evaluation-harness (`elbokto eval`)
elbokto selfcheck       every kernel backend against the float64 oracle
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace

from elbokto.cli_args import (
    DemoArgs,
    DiagnoseArgs,
    GenerateArgs,
    MergeArgs,
    PrecomputeArgs,
    filter_eps_flag,
    parse_flags,
)
from elbokto.presets import PresetArgs

COMMANDS = ("train", "precompute-ref", "generate", "diagnose", "merge", "demo", "eval", "selfcheck")


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user error (a bad flag value, file, row or model; non-finite numbers
    in training) prints one line, ``elbokto <command>: error: ...``, and exits 2; with
    ``ELBOKTO_DEBUG=1`` it raises with its traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    prog = command  # the name errors are reported under, with eval's subcommand
    if command == "eval" and rest and not rest[0].startswith("-"):
        prog = f"eval {rest[0]}"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(command, rest)
    except USER_ERRORS as err:
        if os.environ.get("ELBOKTO_DEBUG", "0") not in ("", "0"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the message's layout
        print(f"elbokto {prog}: error: {message or type(err).__name__}", file=sys.stderr)
        return 2


# What a user's input or installation can raise (ValueError also covers NonFiniteError;
# ImportError: a missing optional package or a refused version); anything else is a bug and keeps
# its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ImportError,
)


def _run(command: str, rest: list[str]) -> int:
    if command == "selfcheck":
        from elbokto_kernels.selfcheck import run as run_selfcheck

        return 0 if run_selfcheck() else 1
    if command == "eval":
        from elbokto.eval.cli import main as eval_main

        return eval_main(rest)
    if command == "demo":
        from elbokto.demo import DemoConfig, run_seeds

        (args,) = parse_flags(command, [DemoArgs], rest)
        config = DemoConfig(filter_eps=filter_eps_flag(args.filter_eps, half=False))
        if args.beta is not None:
            config = replace(config, loss=replace(config.loss, beta=args.beta))
        config = replace(
            config,
            **{
                name: getattr(args, name)
                for name in ("kto_lr", "kto_epochs")
                if getattr(args, name) is not None
            },
        )
        if args.online:
            from elbokto.demo.online import run_online_demo

            if args.ablate:
                raise ValueError(
                    "--online compares the default offline run with the online one; "
                    "run --ablate on its own"
                )
            run_online_demo(
                args.output_dir,
                args.seeds,
                quick=args.quick,
                config=config,
                sft_cache=args.sft_cache,
            )
            return 0
        run_seeds(
            args.output_dir,
            args.seeds,
            ablate=args.ablate,
            quick=args.quick,
            config=config,
            sft_cache=args.sft_cache,
        )
        return 0

    from elbokto import run
    from elbokto.data import DataConfig
    from elbokto.models import ModelConfig
    from elbokto.sampling import SamplingConfig
    from elbokto.trainer import ELBOKTOConfig

    if command == "train" and "--online" in rest:
        from elbokto.online import OnlineConfig, train_online

        model_cfg, data_cfg, online_cfg = parse_flags(
            command, [ModelConfig, DataConfig, OnlineConfig], rest
        )
        train_online(
            model_cfg,
            data_cfg,
            online_cfg,
            resume_from_checkpoint=online_cfg.resume_from_checkpoint,
        )
    elif command == "train":
        model_cfg, data_cfg, train_cfg, _ = parse_flags(
            command, [ModelConfig, DataConfig, ELBOKTOConfig, PresetArgs], rest
        )
        # --resume_from_checkpoint is TrainingArguments'; "last" resumes from the newest one.
        run.train(
            model_cfg, data_cfg, train_cfg, resume_from_checkpoint=train_cfg.resume_from_checkpoint
        )
    elif command == "precompute-ref":
        model_cfg, data_cfg, train_cfg, extras, _ = parse_flags(
            command, [ModelConfig, DataConfig, ELBOKTOConfig, PrecomputeArgs, PresetArgs], rest
        )
        table = run.precompute_ref(
            model_cfg, data_cfg, train_cfg, extras.output_file, extras.train_world_size
        )
        print(
            f"wrote {table.uids.numel()} reference ELBOs x {table.meta['epochs']} epochs to "
            f"{extras.output_file}"
        )
    elif command == "generate":
        model_cfg, gen_cfg, args = parse_flags(
            command, [ModelConfig, SamplingConfig, GenerateArgs], rest
        )
        for prompt, response in run.generate_text(model_cfg, gen_cfg, args):
            print(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False))
    elif command == "diagnose":
        model_cfg, data_cfg, train_cfg, args, _ = parse_flags(
            command, [ModelConfig, DataConfig, ELBOKTOConfig, DiagnoseArgs, PresetArgs], rest
        )
        noise = args.gradient_noise
        print(
            f"{'n_t':>4} {'n_yt':>5} {'estimator':>12} {'Psi':>11} {'v':>11} {'c':>11}"
            + (f" {'grad noise':>11}" if noise else "")
        )
        for row in run.diagnose(model_cfg, data_cfg, train_cfg, args):
            print(
                f"{row['n_t']:>4} {row['n_yt']:>5} {row['estimator']:>12} {row['psi']:>11.4g} "
                f"{row['v']:>11.4g} {row['c']:>11.4g}"
                + (f" {row['gradient_noise']:>11.4g}" if noise else "")
            )
    elif command == "merge":
        model_cfg, args = parse_flags(command, [ModelConfig, MergeArgs], rest)
        print(f"wrote the merged model to {run.merge(model_cfg, args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
