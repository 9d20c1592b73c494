"""The experiment spec: params files (and their JSON Schema), run naming and epoch layout. The workflow parses it: no
torch, no pandas."""
