"""The names users choose from (datasets, models), importable without torch: the CLI's --help and
config validation need the names, not the code behind them."""

DATASETS = ("digits", "mnist", "cifar10")
MODELS = ("logreg", "mlp", "cnn", "resnet20", "vgg11")
