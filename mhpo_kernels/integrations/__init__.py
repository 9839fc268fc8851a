"""Adapters for RL trainers: ``integrations.trl`` (TRL's GRPOTrainer) and ``integrations.verl``
(verl's policy-loss registry). Each imports its framework, so import the one you use."""
