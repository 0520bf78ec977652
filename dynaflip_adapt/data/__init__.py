"""Site logs: HDF5 layouts -> canonical episodes, validation, streaming datasets, fingerprints."""
