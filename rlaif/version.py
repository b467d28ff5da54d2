"""The package version, in a module of its own so any part can read it without importing the
package root (which imports the public API, and with it most of the package)."""

__version__ = "0.1.0"
