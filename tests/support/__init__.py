"""Test support that ships with the package: a local Hugging Face Hub endpoint, fake Flower parts."""
