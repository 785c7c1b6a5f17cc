"""The foundation every other package builds on: typed configs, the Strategy value, dtypes,
layout arithmetic, checks, file and launch helpers. Imports nothing else of the package."""
