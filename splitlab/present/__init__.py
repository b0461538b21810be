"""Recorded results, plots, widgets and the HTML report; nothing below this package imports it."""
