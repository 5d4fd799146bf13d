"""
The command line of every script: one parser whose --help shows each option's default and whose
errors are one line (with the nearest flag for a mistyped one), and the flag types that check every
count, size and rate before any work (one line, exit status 2).
"""
import argparse
import copy
import difflib
import math

import torch


F32_MAX = torch.finfo(torch.float32).max

class Help(argparse.RawDescriptionHelpFormatter):
    """--help as every script prints it: the description as written, and each option with its
    default (a flag whose help already speaks of its default, or whose default is unset, None or
    False, says nothing more)."""
    def _format_action(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in (action.help or ""):
            action = copy.copy(action)
            action.help = (action.help + " " if action.help else "") + "(default: %(default)s)"
        return super()._format_action(action)

class Parser(argparse.ArgumentParser):
    """The command line of every script: --help shows each option's default (Help); an error is one
    line like every other bad input (no usage block), `error: argument --lr: ...`, and a flag the
    parser does not know gets the nearest one it does: `unrecognized arguments: ... (did you mean
    ...?)`."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, formatter_class=Help))

    def flags(self):
        # every option string of this parser and of its subcommands' parsers
        subs = [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                for p in a.choices.values()]
        return set(self._option_string_actions).union(*(p.flags() for p in subs
                                                        if isinstance(p, Parser)))

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = sorted(self.flags())
            near = [difflib.get_close_matches(w.split("=")[0], known, 1, 0.6)
                    for w in message.split(":", 1)[1].split() if w.startswith("--")]
            hints = sorted({n[0] for n in near if n})
            if hints:
                message += f" (did you mean {' or '.join(hints)}?)"
        self.exit(2, f"error: {message} ({self.prog} --help)\n")

def int_in(lo, hi=None):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}"
                                             + (f" and at most {hi}" if hi else ""))
        return v
    return parse

def float_in(lo=-math.inf, hi=math.inf, above=False):
    """An argparse type: a number finite in fp32 (flags reach the model as fp32: 1e39 is inf there),
    >= lo (> lo where above), <= hi. nan and inf are refused: one of them in a weight or a rate
    turns every parameter into NaN at once."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        # NaN fails the first test
        if not abs(v) <= F32_MAX or v < lo or (above and v == lo) or v > hi:
            raise argparse.ArgumentTypeError(f"{s} must be finite" + (
                f" and {'>' if above else '>='} {lo:g}" if lo > -math.inf else "") +
                (f" and <= {hi:g}" if hi < math.inf else ""))
        return v
    return parse

# the types the trainers' flags share
positive, count = int_in(1), int_in(0)        # counts where 0 means nothing / where 0 is meaningful
weight, positive_float = float_in(0.0), float_in(0.0, above=True)
# AdamW moves every weight by about lr per step whatever the gradient's scale, so an lr of 1 already
# changes each weight by its own magnitude each step: above that no run learns; the bound catches
# typos such as 1e3 for 1e-3
MAX_LR = 1.0
learning_rate = float_in(0.0, MAX_LR, above=True)
