"""Measuring encoders and adapters: the audit and its strength fit, drift, retrieval, backbone
probes, attention maps, and the out-of-distribution benchmark's ablations, offline scores and
summary."""
