"""The run directory: where every artefact lives, stamps and stage status, the run lock, the
run log, the model card and the stain reference stored with the run.
"""
