"""Training loops (pretrain, finetune). No CLI and no MLflow here: callers pass callbacks."""
