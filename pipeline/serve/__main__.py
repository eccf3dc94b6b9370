from pipeline.serve.cli import main

raise SystemExit(main())
