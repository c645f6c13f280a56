-- A second PHP-era schema: utf8 (utf8mb3), estado ENUM in another order with a value of its
-- own ('archivado') and NULL allowed, different column names (creado, respuesta), session
-- names duplicated and no session state at all, envios_whatsapp with sesion_id but no
-- cliente_id index; a "next_attempt_at" nobody had; a zero-date default (a non-strict PHP
-- host's habit, which MySQL refuses under NO_ZERO_DATE). No unique keys anywhere.
CREATE TABLE sesiones_envio (
  id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  nombre VARCHAR(100) NOT NULL,
  descripcion VARCHAR(255) NULL,
  creado DATETIME NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_general_ci;

CREATE TABLE cola_envios (
  id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sesion_id INT UNSIGNED NOT NULL,
  cliente_id INT UNSIGNED NULL,
  telefono VARCHAR(30) NOT NULL,
  mensaje MEDIUMTEXT NOT NULL,
  estado ENUM('pendiente','enviado','error','procesando','archivado') NULL DEFAULT 'pendiente',
  intentos TINYINT NOT NULL DEFAULT 0,
  respuesta TEXT NULL,
  creado DATETIME NULL,
  actualizado DATETIME NOT NULL DEFAULT '0000-00-00 00:00:00',
  KEY idx_sesion_estado (sesion_id, estado)
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_general_ci;

CREATE TABLE envios_whatsapp (
  id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT UNSIGNED NOT NULL,
  sesion_id INT UNSIGNED NOT NULL,
  cliente_id INT UNSIGNED NULL,
  telefono VARCHAR(30) NOT NULL,
  wamid VARCHAR(100) NOT NULL DEFAULT '',
  fecha_envio DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8 COLLATE=utf8_general_ci;

INSERT INTO sesiones_envio (id, nombre, descripcion, creado) VALUES
  (1, 'campaña marzo', 'primera', '2023-03-01 09:00:00'),
  (2, 'campaña marzo', 'se volvió a crear', '2023-03-02 09:00:00'),
  (3, 'recordatorios', NULL, '2023-04-01 09:00:00');

INSERT INTO cola_envios (id, sesion_id, cliente_id, telefono, mensaje, estado, intentos, respuesta, creado) VALUES
  (100, 1, 11, '+34600000001', '{"type":"text","text":{"body":"¡hola!"}}', 'enviado', 1, 'ok', '2023-03-01 09:00:00'),
  (101, 1, 11, '+34600000001', '{"type":"text","text":{"body":"¡hola!"}}', 'enviado', 1, 'ok', '2023-03-01 09:00:00'),
  (102, 1, 11, '+34600000001', '{"type":"text","text":{"body":"¡hola!"}}', 'enviado', 1, 'ok', '2023-03-01 09:00:00'),
  (103, 2, 12, '+34600000002', '{"type":"text","text":{"body":"¡hola!"}}', 'error', 2, 'fallo', '2023-03-02 09:00:00'),
  (104, 2, 13, '+34600000003', '{"type":"text","text":{"body":"¡hola!"}}', 'archivado', 1, NULL, '2023-03-02 09:00:00'),
  (105, 3, 14, '+34600000004', '{"type":"text","text":{"body":"recordatorio"}}', 'pendiente', 0, NULL, '2023-04-01 09:00:00'),
  (106, 3, 15, '+34600000005', '{"type":"text","text":{"body":"recordatorio"}}', 'pendiente', 0, NULL, '2023-04-01 09:00:00'),
  (107, 3, 16, '+34600000006', '{"type":"text","text":{"body":"recordatorio"}}', 'pendiente', 0, NULL, '2023-04-01 09:00:00'),
  (108, 3, 17, '+34600000007', '{"type":"text","text":{"body":"recordatorio"}}', 'procesando', 1, NULL, '2023-04-01 09:00:00'),
  (109, 3, 18, '+34600000008', '{"type":"text","text":{"body":"recordatorio"}}', 'error', 1, '131026', '2023-04-01 09:00:00');

INSERT INTO envios_whatsapp (id, cola_id, sesion_id, cliente_id, telefono, wamid, fecha_envio) VALUES
  (1, 100, 1, 11, '+34600000001', 'wamid.B100', '2023-03-01 09:01:00'),
  (2, 100, 1, 11, '+34600000001', 'wamid.B100b', '2023-03-01 09:01:00'),
  (3, 101, 1, 11, '+34600000001', 'wamid.B101', '2023-03-01 09:01:01'),
  (4, 102, 1, 11, '+34600000001', 'wamid.B102', '2023-03-01 09:01:02'),
  (5, 102, 1, 11, '+34600000001', 'wamid.B102b', '2023-03-01 09:01:02'),
  (6, 102, 1, 11, '+34600000001', '', '2023-03-01 09:01:03');
