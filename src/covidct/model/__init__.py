"""Networks, their data and their training. ``covidct.model.covid19net(input_shape)`` builds
COVID-19Net; Keras is imported only when a network is asked for."""


def __getattr__(name):
    if name in ("covid19net", "feature_model"):
        from covidct.model import architecture

        return getattr(architecture, name)
    raise AttributeError(f"module 'covidct.model' has no attribute {name!r}")
