"""vipamin_scale."""
