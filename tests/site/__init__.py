"""Tests of the observatory site mode (buffer + replay)."""
