"""enforcer package."""
