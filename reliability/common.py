"""
The harness the reliability drills share: an entry point run as a user meets it, in this process
(run_script, attempt), and one table cell of what it printed (said, cell); Opens, a pickle that
would run code.
"""
import contextlib
import io
import os
import re
import runpy
import sys

from reliability.faults import ROOT

# -----------------------------------------------------------------------------
# running an entry point as a user meets it, and one table cell of what happened

def run_script(script, argv):
    """`python SCRIPT ARGV` inside this process: the repository's file run as __main__ with sys.argv
    set, which is what its command line runs (a script is no library to import; in-process it takes
    milliseconds where a subprocess takes seconds). Its sys.exit raises SystemExit: attempt() reads
    the exit status from it."""
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = saved

def attempt(fn, errors=()):
    """fn() as a user meets it -> (value or None, what it printed, status). status: 0, the
    SystemExit status, 2 for an exception of `errors` (what the command lines print as one `error:`
    line), or "traceback" for any other exception: that would be a bug, and the table says so."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return fn(), out.getvalue(), 0
        except SystemExit as e:
            return None, out.getvalue(), e.code
        except errors as e:
            return None, out.getvalue() + f"error: {e}\n", 2
        except Exception as e:
            return None, out.getvalue() + f"TRACEBACK {type(e).__name__}: {e}\n", "traceback"

def said(text, *starts):
    # the first printed line that starts with one of `starts`
    return next((line for line in text.splitlines() if line.startswith(starts)), "")

def cell(text, strip, width=120):
    # one table cell: no work folder names, no pipes, not too long
    text = (
        re.sub(r"w/\d+-\d+/", "", text.replace(strip, "")).replace("error: ", "").replace("|", "/"))
    return text if len(text) <= width else text[:width - 3] + "..."

class Opens:
    """Pickled, this object's recipe is `open(path, "w")`: unpickling it would create the file. A
    stand-in for a pickle that runs code: the file's absence proves no loader unpickled it."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")
