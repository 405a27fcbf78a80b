"""Host measurements that every benchmark reports beside its figures (the lowest layer: imports
nothing of the project)."""
