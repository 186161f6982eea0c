"""The standard metric of each downstream task: VQA accuracy, caption scores, recall at K, box IoU."""
