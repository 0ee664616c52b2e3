"""What counts as a user error (a wrong input: a file, a key, a value, the disk) and how it is
worded. The entry points (:mod:`afigan.engine.cli`) print such an error as one sentence instead
of a traceback; any other exception is treated as a bug and keeps its traceback."""

import os
import re
import sys

__all__ = ["USER_ERRORS", "is_user_error_name", "debug_enabled", "user_message", "require_file"]

# The one list of user-error types. A subclass counts too (FileNotFoundError, JSONDecodeError,
# afigan.data.image_io.UnreadableImageError), in this process (``except USER_ERRORS``) and in a
# spawned rank, whose error only arrives as text (:func:`is_user_error_name`).
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)


def is_user_error_name(name: str) -> bool:
    """Whether the exception type a traceback prints as ``name`` ("ValueError",
    "json.decoder.JSONDecodeError", "afigan.data.image_io.UnreadableImageError") is one of
    :data:`USER_ERRORS` or a subclass. A traceback names a built-in type bare and any other with
    its module, so the type is looked up among the loaded modules (a spawned rank runs the same
    program, so its error types are loaded here too); an unknown name is not a user error."""
    module, _, qualname = name.rpartition(".")
    cls = getattr(sys.modules.get(module or "builtins"), qualname, None)
    return isinstance(cls, type) and issubclass(cls, USER_ERRORS)


def debug_enabled() -> bool:
    """``--debug`` (which sets it) or ``AFIGAN_DEBUG=1``: show tracebacks of user errors too."""
    return os.environ.get("AFIGAN_DEBUG", "") not in ("", "0")


def user_message(e: BaseException) -> str:
    """The message of a user error as one line (KeyError's str() adds quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if isinstance(e, OSError) and e.errno is not None and e.strerror and e.filename is None:
        msg = e.strerror  # OSError(errno, sentence): str() would prefix "[Errno N]"
    if "Original Traceback (most recent call last):" in msg:
        # Re-raised from a DataLoader worker with the worker's traceback in the message: keep its last line.
        last = [line for line in msg.splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last
    return " ".join(msg.split())


def require_file(path: str, key: str) -> str:
    """Return ``path`` if it is an existing file, else raise one sentence naming the config key."""
    if not path:
        raise ValueError(f"{key} is empty; set it to the path of the checkpoint this stage starts from.")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key}: file {path!r} does not exist; give the path of an existing checkpoint "
            f"(.pth or .pkl) or fix the path."
        )
    return path
