"""The tracking store and what lives in it: the MLflow client (`client`), where it is
(`store`), backbone and adapter versions (`backbones`, `adapters`) and per-site promotion,
rollback and pinned policies (`lifecycle`)."""
