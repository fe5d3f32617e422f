"""TOML presets for consumer GPUs, installed as package data of `lpl_plugin.configs`."""
