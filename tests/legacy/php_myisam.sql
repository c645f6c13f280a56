-- The same PHP-era schema as php_latin1.sql on MyISAM (MySQL's default engine until 5.5, and
-- what old PHP code names): no row locks, no transactions. migrate converts it to InnoDB.
-- A PHP-era schema as procesar_cola.php knew it: INT ids, latin1, the four-value ENUM,
-- Spanish columns, no unique keys, an auto-updated TIMESTAMP, envios_whatsapp without sesion_id.
CREATE TABLE sesiones_envio (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  nombre VARCHAR(150) NOT NULL,
  estado ENUM('activa','pausada','completada') NOT NULL DEFAULT 'activa',
  fecha_creacion TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=MyISAM DEFAULT CHARSET=latin1;

CREATE TABLE cola_envios (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sesion_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  mensaje TEXT NOT NULL,
  estado ENUM('pendiente','procesando','enviado','error') NOT NULL DEFAULT 'pendiente',
  intentos INT NOT NULL DEFAULT 0,
  respuesta_api TEXT NULL,
  error_msg VARCHAR(255) NULL,
  fecha_creacion TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  fecha_actualizacion TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  KEY idx_estado (estado),
  KEY idx_sesion (sesion_id)
) ENGINE=MyISAM DEFAULT CHARSET=latin1;

CREATE TABLE envios_whatsapp (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  wamid VARCHAR(100) NULL,
  fecha_envio DATETIME NOT NULL,
  KEY idx_cola (cola_id)
) ENGINE=MyISAM DEFAULT CHARSET=latin1;

INSERT INTO sesiones_envio (id, nombre, estado, fecha_creacion) VALUES
  (27, 'sesion #27', 'completada', '2024-03-01 10:00:00'),
  (28, 'sesion #28', 'activa', '2024-03-02 10:00:00');

-- Session 27 is the old bug's: the same phone queued twice, sent twice (three envios rows
-- for cola 1), one copy in error. Session 28 has rows in all four states, two left procesando,
-- and a waiting copy of row 5 (same session, same phone): sending it would be the bug again.
INSERT INTO cola_envios
  (id, sesion_id, cliente_id, telefono, mensaje, estado, intentos, respuesta_api, error_msg,
   fecha_creacion, fecha_actualizacion) VALUES
  (1, 27, 501, '+51987000001', '{"type":"text","text":{"body":"hola"}}', 'enviado', 1, '{"messages":[{"id":"wamid.A1"}]}', NULL, '2024-03-01 10:00:00', '2024-03-01 10:05:00'),
  (2, 27, 501, '+51987000001', '{"type":"text","text":{"body":"hola"}}', 'enviado', 1, '{"messages":[{"id":"wamid.A2"}]}', NULL, '2024-03-01 10:00:00', '2024-03-01 10:05:00'),
  (3, 27, 501, '+51987000001', '{"type":"text","text":{"body":"hola"}}', 'error', 3, NULL, 'timeout', '2024-03-01 10:00:00', '2024-03-01 10:06:00'),
  (4, 27, 502, '+51987000002', '{"type":"text","text":{"body":"hola"}}', 'enviado', 1, '{"messages":[{"id":"wamid.A4"}]}', NULL, '2024-03-01 10:00:00', '2024-03-01 10:05:00'),
  (5, 28, 601, '+51987000011', '{"type":"text","text":{"body":"buenos dias"}}', 'pendiente', 0, NULL, NULL, '2024-03-02 10:00:00', '2024-03-02 10:00:00'),
  (6, 28, 602, '+51987000012', '{"type":"text","text":{"body":"buenos dias"}}', 'pendiente', 0, NULL, NULL, '2024-03-02 10:00:00', '2024-03-02 10:00:00'),
  (7, 28, 603, '+51987000013', '{"type":"text","text":{"body":"buenos dias"}}', 'procesando', 1, NULL, NULL, '2024-03-02 10:00:00', '2024-03-02 10:01:00'),
  (8, 28, 604, '+51987000014', '{"type":"text","text":{"body":"buenos dias"}}', 'procesando', 1, NULL, NULL, '2024-03-02 10:00:00', '2024-03-02 10:01:00'),
  (9, 28, 605, '+51987000015', '{"type":"text","text":{"body":"buenos dias"}}', 'enviado', 1, '{"messages":[{"id":"wamid.A9"}]}', NULL, '2024-03-02 10:00:00', '2024-03-02 10:02:00'),
  (10, 28, 606, '+51987000016', '{"type":"text","text":{"body":"buenos dias"}}', 'error', 1, '{"error":{"code":131026}}', 'Message undeliverable', '2024-03-02 10:00:00', '2024-03-02 10:02:00'),
  (11, 28, 601, '+51987000011', '{"type":"text","text":{"body":"buenos dias"}}', 'pendiente', 0, NULL, NULL, '2024-03-02 10:00:00', '2024-03-02 10:00:00');

INSERT INTO envios_whatsapp (id, cola_id, cliente_id, telefono, wamid, fecha_envio) VALUES
  (1, 1, 501, '+51987000001', 'wamid.A1', '2024-03-01 10:05:00'),
  (2, 1, 501, '+51987000001', 'wamid.A1b', '2024-03-01 10:05:01'),
  (3, 1, 501, '+51987000001', 'wamid.A1c', '2024-03-01 10:05:02'),
  (4, 2, 501, '+51987000001', 'wamid.A2', '2024-03-01 10:05:03'),
  (5, 4, 502, '+51987000002', 'wamid.A4', '2024-03-01 10:05:04'),
  (6, 9, 605, '+51987000015', 'wamid.A9', '2024-03-02 10:02:00'),
  (7, 9, 605, '+51987000015', 'wamid.A9b', '2024-03-02 10:02:01');
