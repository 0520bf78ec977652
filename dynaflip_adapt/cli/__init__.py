"""The Typer CLI. Modules here stay thin: parse, call one library function, print.

Nothing heavy (torch, h5py, mlflow, peft) is imported at module level, so ``--help`` is instant.
"""
