"""Deployment artefacts: Dockerfile, compose.yaml and k8s/ (static checks and the docker tier)."""
