"""The experiment spec: params files, run naming and epoch layout. The workflow parses it: no torch, no pandas."""
