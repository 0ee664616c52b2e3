"""The functions behind ``tools/*.py`` (kept here so tests reach them): one per entry point,
each taking Detectron2's parsed ``default_argument_parser`` arguments and run under ``launch``."""

import argparse
import functools
import logging
import os
import re
import sys

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from afigan.checkpoint import AFICheckpointer
from afigan.config import cuda_missing, load_config

from .detector import DetectorTrainer
from .errors import USER_ERRORS, debug_enabled, is_user_error_name, user_message
from .inputs import check_inputs
from .lazy import lazy_main
from .setup import setup_cfg
from .stages import STAGES

__all__ = [
    "train_stage",
    "eval_only",
    "stage_main",
    "tool_parser",
    "launch_stage",
    "launch_lazy",
    "run_tool",
    "check_launch",
]

logger = logging.getLogger("afigan")


def train_stage(stage: str, args):
    """Train one stage of :data:`afigan.engine.stages.STAGES` ("stage0" = the NN teacher,
    "stage1", "stage2", "stage3"); returns the final evaluation results (empty for stages 1-2)."""
    cfg = setup_cfg(args, stage=stage)
    check_inputs(cfg, STAGES[stage].required, test=STAGES[stage].evaluates)
    trainer = STAGES[stage].trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer keeps the final evaluation (run by its EvalHook) here.
    return dict(getattr(trainer, "_last_eval_results", None) or {})


def eval_only(args):
    """Build the model of ``--config-file``, load ``MODEL.WEIGHTS`` and run COCO evaluation."""
    cfg = setup_cfg(args, stage="eval")
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: give the checkpoint to evaluate, e.g. MODEL.WEIGHTS output/stage3/model_final.pth."
        )
    check_inputs(cfg, train=False)  # MODEL.WEIGHTS is set (above); check that it and every other file exist
    model = DetectorTrainer.build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model: %s parameters (%s trainable).", f"{total:,}", f"{trainable:,}")
    checkpointer = AFICheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    _require_whole_model(checkpointer, cfg.MODEL.WEIGHTS)
    return DetectorTrainer.evaluate(cfg, model)


def _require_whole_model(checkpointer, path: str) -> None:
    """An evaluated model must come whole from its checkpoint: a file of another architecture
    (an FCOS file for a Mask R-CNN config, say) would be evaluated with heads at random."""
    bad = checkpointer.last_incompatible
    if bad is None or not (bad.missing_keys or bad.incorrect_shapes):
        return
    total = len(checkpointer.model.state_dict())
    fit = total - len(bad.missing_keys) - len(bad.incorrect_shapes)
    first = (bad.missing_keys or [k for k, *_ in bad.incorrect_shapes])[0]
    raise ValueError(
        f"MODEL.WEIGHTS {path!r} fits only {fit} of the model's {total} tensors (e.g. {first!r} is "
        f"{'missing' if bad.missing_keys else 'of another shape'}, and {len(bad.unexpected_keys)} of its "
        "tensors are not "
        f"in the model): it is a checkpoint of another architecture; give one trained with this --config-file."
    )


def stage_main(stage: str, args):
    """``tools/stage{N}_train.py`` and ``tools/run_net.py`` (= stage 3): train the stage, or with
    ``--eval-only`` evaluate ``MODEL.WEIGHTS`` where the stage has an evaluation; stages 1-2
    refuse it with one sentence."""
    if args.eval_only:
        if not STAGES[stage].evaluates:
            raise ValueError(
                f"--eval-only: {stage} trains {STAGES[stage].description}, which has no detection "
                f"evaluation; evaluate a detector with tools/run_net.py --eval-only."
            )
        res = eval_only(args)
    else:
        res = train_stage(stage, args)
    return res if comm.is_main_process() else None


def tool_parser(description: str, hide=()) -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` (``--config-file``, ``--resume``, ``--eval-only``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing overrides)
    whose help starts with the tool's own ``description`` and leaves out the flags in ``hide``
    (flags the tool does not honour)."""
    parser = default_argument_parser()
    parser.description, parser.epilog = description, None
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also AFIGAN_DEBUG=1); without it an input error is one sentence",
    )
    for action in parser._actions:  # argparse has no public way to hide an inherited flag
        if set(action.option_strings) & set(hide):
            action.help = argparse.SUPPRESS
    return parser


def check_launch(args, cfg=None) -> None:
    """Checks of ``--num-gpus`` that must run before processes are spawned: GPUs asked for on a
    machine without them, and ``SOLVER.IMS_PER_BATCH`` not divisible by the number of processes.
    Unlike a one-process run (:func:`afigan.config.device_fallback` moves it to the CPU), several
    processes asked for as GPUs stop: the user meant GPUs, and CPU processes need gloo."""
    world = args.num_gpus * args.num_machines
    if world <= 1 or cfg is None:
        return
    if cuda_missing(cfg.MODEL.DEVICE):
        raise ValueError(
            f"--num-gpus {args.num_gpus}: this machine has no GPU; to train with {args.num_gpus} CPU processes "
            "(gloo, as "
            f"tests/test_ddp_pipeline.py does) add MODEL.DEVICE cpu, or drop --num-gpus to run one process."
        )
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number of "
            f"processes ({world} = --num-gpus x --num-machines); change one of them."
        )


def _launch(main, args, cfg=None):
    check_launch(args, cfg)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


_FAILED_RANK = re.compile(r"-- Process (\d+) terminated with the following error:\n(.*)", re.S)
_LAST_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*): (.*)", re.M)


def _rank_error(e: BaseException):
    """(rank, type name as the traceback prints it, message) of a worker's exception as
    torch.multiprocessing reports it (a ProcessRaisedException carrying the worker's formatted
    traceback), else None."""
    m = _FAILED_RANK.search(str(e))
    if not m:
        return None
    found = list(_LAST_EXCEPTION.finditer(m.group(2)))
    if not found:
        return None
    name, message = found[-1].group(1), m.group(2)[found[-1].start(2) :].strip()
    if name.rsplit(".", 1)[-1] == "KeyError" and message[:1] in "'\"" and message[-1:] == message[:1]:
        message = message[1:-1]
    return int(m.group(1)), name, message


def run_tool(main, args, *main_args):
    """Run an entry point's ``main(*main_args)`` (``args``: its parsed arguments). An input error
    (:data:`afigan.engine.errors.USER_ERRORS`, in this process or in a spawned rank) prints one
    sentence on stderr and exits with status 1; ``--debug`` / ``AFIGAN_DEBUG=1`` re-raise it with
    its traceback. Any other exception is a bug and keeps its traceback."""
    if getattr(args, "debug", False):
        os.environ["AFIGAN_DEBUG"] = "1"  # spawned ranks read it too
    try:
        return main(*main_args)
    except USER_ERRORS as e:
        if debug_enabled():
            raise
        _fail(_with_origin(user_message(e), e))
    except Exception as e:  # noqa: BLE001 - only to recognise a spawned rank's user error
        failed = _rank_error(e)
        if failed is None or not is_user_error_name(failed[1]) or debug_enabled():
            raise
        rank, _, message = failed
        _fail(f"rank {rank} of {args.num_gpus * args.num_machines}: {' '.join(message.split())}")


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _with_origin(message: str, e: BaseException) -> str:
    """afigan's own messages name the key and what to do; one raised inside a library (torch,
    Detectron2, fvcore) may not, so it also says where it came from and how to see the traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    origin = os.path.abspath(tb.tb_frame.f_code.co_filename) if tb is not None else _PACKAGE
    if origin.startswith(_PACKAGE + os.sep) or "Original Traceback" in str(
        e
    ):  # (a DataLoader worker's error: its own place is lost)
        return message
    where = os.sep.join(origin.split(os.sep)[-3:])
    return f"{message.rstrip('.')} (raised in {where}; --debug shows the traceback)."


def _fail(sentence: str):
    print(f"Error: {sentence}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _launch_checked(main, args):
    # The config is read once here, before any process is spawned, so a bad file, key or value
    # stops with one sentence and --num-gpus is checked against it.
    return _launch(main, args, load_config(args.config_file, args.opts) if args.config_file or args.opts else None)


def launch_stage(stage: str, description: str, argv=None):
    """A stage script's ``__main__``: :func:`tool_parser`, then :func:`stage_main` under
    Detectron2's ``launch``. Stages without an evaluation do not list ``--eval-only``."""
    hide = () if STAGES[stage].evaluates else ("--eval-only",)
    args = tool_parser(description, hide).parse_args(argv)
    return run_tool(_launch_checked, args, functools.partial(stage_main, stage), args)


def launch_lazy(description: str, argv=None):
    """``tools/lazy_train_net.py``'s ``__main__``: :func:`afigan.engine.lazy.lazy_main` under ``launch``."""
    args = tool_parser(description).parse_args(argv)
    return run_tool(_launch, args, lazy_main, args)
