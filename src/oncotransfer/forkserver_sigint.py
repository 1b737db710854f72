"""Imported first by the grid's fork server (``experiments.local_executor``), outside the experiments package,
whose import pulls in torch: from here on the server ignores Ctrl-C.

Python's fork server sets SIGINT to ignored only after importing its preload modules, which takes seconds
(torch); a Ctrl-C meanwhile, sent to the whole process group by the terminal, printed a KeyboardInterrupt
traceback from the server. The grid process handles Ctrl-C and stops the server and its workers.
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
