from charrnn.cli import main

raise SystemExit(main())
